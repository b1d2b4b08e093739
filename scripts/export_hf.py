"""Export a GPT trained here to the Hugging Face format, to load it with `transformers` or share it.

    python scripts/export_hf.py --ckpt runs/mini-gpt/<run>/checkpoints/best-step=400.ckpt \\
        --out exported/shakespeare-gpt2

The folder gets config.json and model.safetensors (``GPT2LMHeadModel.from_pretrained(folder)``
loads them), and the tokenizer: GPT-2's BPE files (``AutoTokenizer.from_pretrained(folder)``), or,
for characters, which Hugging Face has no format for, this project's own file. The folder is a
source like any other here: ``scripts/sample.py --init-from FOLDER``, ``--model.init_from FOLDER``.
Only a model of GPT-2's architecture exports: learned positions, LayerNorm, a GELU MLP, no
QK-norm, grouped-query attention, window or logit cap (a model without biases gets zeros there).
Needs ``pip install -e '.[hf]'``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import (  # isort: split
    ArgumentParser,
    UsageError,
    exit_at_once_on_ctrl_c,
    exit_code,
)

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

from model.checkpoint import load_gpt_checkpoint
from model.hf_gpt2 import save_hf


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="GPT checkpoint written by train.py")
    p.add_argument("--out", required=True, help="folder to write (new, or empty)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder; choose a new one")
    model, tokenizer = load_gpt_checkpoint(args.ckpt)
    save_hf(model, out, tokenizer)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    sys.exit(exit_code(main))
