"""Sample text from a trained checkpoint, or from GPT-2.

    python scripts/sample.py --ckpt runs/mini-gpt/<run>/checkpoints/last.ckpt --prompt "ROMEO:"
    python scripts/sample.py --ckpt model.ckpt --prompt-file prompt.txt --num-samples 3 \\
        --temperature 0.8 --top-k 200 --max-new-tokens 500 --stop "\\n\\n" --stream
    python scripts/sample.py --init-from gpt2 --prompt "The meaning of life is"

The checkpoint alone is enough: it holds the model's config and its tokenizer. ``--init-from``
takes the published GPT-2 weights instead (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``:
downloaded once, with ``pip install -e '.[hf]'``), or a Hugging Face GPT-2 folder (as
scripts/export_hf.py writes). Without a prompt, generation starts from the tokenizer's start
token (a newline for characters, <|endoftext|> for GPT-2), which the output leaves out; an empty
prompt, or an empty prompt file, is refused (an unset shell variable, or the wrong file). Sample
i is drawn with seed --seed + i, so it is the same streamed or not. Past the model's block_size, a
model with learned positions crops the context to its last half; one with rotary positions rolls
its KV cache and reads a prompt of any length (see GPT._decode).
"""

import sys
from functools import partial
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

import torch

from model.checkpoint import load_checkpoint, load_model
from model.sampling import check_sampling_args
from scripts._common import add_device_argument, pick_device


def prompt_ids(tokenizer, prompt: str | None, block_size: int | None) -> list[int]:
    """The prompt's token ids; block_size: the longest prompt the model reads (None: any)."""
    if not prompt:
        return [tokenizer.start_token]
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise UsageError(f"the prompt cannot be encoded: {e}") from None
    if block_size is not None and len(ids) > block_size:
        raise UsageError(f"the prompt is {len(ids)} tokens long; this model reads at most "
                         f"{block_size} (its block_size: its positions are learned). Shorten the "
                         f"prompt.")
    return ids


def sample(model, tokenizer, ids: list[int], args, generator, echo=None) -> str:
    """One continuation of ids, cut before the first stop string; ``echo(text)`` is called with each
    new piece of text as it comes (streaming)."""
    text, new_ids = "", []
    x = torch.tensor([ids], device=args.device)
    for step in model.stream(x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             use_cache=not args.no_cache, generator=generator):
        new_ids.append(step.item())
        new_text = tokenizer.decode(new_ids)
        cuts = [new_text.find(s) for s in args.stop if s in new_text]
        if cuts:
            new_text = new_text[:min(cuts)]
        elif new_text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        if echo:
            echo(new_text[len(text):])
        text = new_text
        if cuts:
            break
    return text


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint written by train.py")
    source.add_argument("--init-from", metavar="SOURCE",
                        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 "
                             "folder (or a checkpoint, as --ckpt)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", default=None,
                       help="text to continue (not empty); without it, generation starts from the "
                            "tokenizer's start token (a newline for characters, <|endoftext|> for "
                            "GPT-2), which is not printed")
    group.add_argument("--prompt-file", default=None, help="file whose text to continue")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[],
                   help="end a sample at this text (repeatable)")
    p.add_argument("--seed", type=int, default=1337)
    add_device_argument(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context at every step")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.device = pick_device(args.device)
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise UsageError("--num-samples must be at least 1 and --max-new-tokens at least 0")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the prompt file: {e}") from None
    if prompt == "":
        given = f"--prompt-file {args.prompt_file} is empty" if args.prompt_file \
            else "--prompt is empty"
        raise UsageError(f"{given}: give text to continue, or leave the prompt out to start from "
                         f"the tokenizer's start token")
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    source = args.ckpt or args.init_from
    load = load_checkpoint if args.ckpt else load_model  # --ckpt: one of ours, nothing else
    model, tokenizer, _ = load(source, args.device, kind="gpt")
    if tokenizer is None:
        raise UsageError(f"{source} has a vocabulary of {model.config.vocab_size} tokens and no "
                         f"tokenizer this project knows (GPT-2's has 50257), so no prompt can be "
                         f"encoded for it nor a sample decoded")
    learned = model.config.pos_emb == "learned"  # rotary positions read prompts of any length
    ids = prompt_ids(tokenizer, prompt, model.config.block_size if learned else None)
    head = tokenizer.decode(ids) if prompt else ""
    for i in range(args.num_samples):  # one at a time, with seed + i: the same text streamed or not
        generator = torch.Generator(args.device).manual_seed(args.seed + i)
        if args.stream:
            print(head, end="", flush=True)
            sample(model, tokenizer, ids, args, generator, echo=partial(print, end="", flush=True))
            print("\n---------------", flush=True)
        else:
            print(head + sample(model, tokenizer, ids, args, generator) + "\n---------------")


if __name__ == "__main__":
    sys.exit(exit_code(main))
