"""Translate with a trained seq2seq checkpoint, or score it with sacreBLEU on a parallel file pair.

    python scripts/translate.py --ckpt runs/mini-gpt/<run>/checkpoints/last.ckpt \
        --text "Ein Hund rennt."
    python scripts/translate.py --ckpt model.ckpt --file sentences.de > sentences.en  # one per line
    cat sentences.de | python scripts/translate.py --ckpt model.ckpt --beam 1   # stdin, greedy
    python scripts/translate.py --ckpt model.ckpt --eval val.de.gz val.en.gz --output hyps.en

The checkpoint alone is enough: it holds the model's config and its BPE vocabulary. Beam search
(default beam 4, GNMT length penalty 0.6); --beam 1 is greedy. --eval prints the standard cased
sacreBLEU and the lowercased one, on detokenized text. Files may be gzipped. A blank --text (empty,
or spaces only) is refused; a blank line of the input (--file, stdin, --eval's SRC) is translated
as a blank line, and stderr names it; input of blank lines only is refused.
"""

import gzip
import sys
import time
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

from model.checkpoint import load_seq2seq_checkpoint
from model.translate import bleu, bleu_signature, translate
from scripts._common import add_device_argument, pick_device


def read_lines(path: str) -> list[str]:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def blank_lines_stay_blank(lines: list[str], source: str) -> list[str]:
    """Lines to translate, one output line each: a blank line (empty, or spaces only, which the
    model would otherwise translate into a made-up sentence) is left blank in the output, so that
    line i of the output is still line i's translation, and stderr says which lines were blank.
    Nothing but blank lines is refused."""
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines:
        raise UsageError(f"{source} is empty: give one sentence to translate per line")
    if len(blank) == len(lines):
        raise UsageError(f"{source} has no text to translate (every line is blank): "
                         "give one sentence per line")
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
        print(f"line{'s' if len(blank) > 1 else ''} {shown} of {source} "
              f"{'are' if len(blank) > 1 else 'is'} blank: left blank in the output",
              file=sys.stderr)
    return [line if line.strip() else "" for line in lines]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="seq2seq checkpoint written by train.py")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="one sentence to translate")
    source.add_argument("--file", default=None, help="a file of sentences, one per line")
    source.add_argument("--eval", nargs=2, metavar=("SRC", "REF"), default=None,
                        help="translate SRC and score it against REF (aligned lines) with "
                             "sacreBLEU")
    p.add_argument("--output", default=None, help="with --eval: also write the translations here")
    p.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="alpha of GNMT's length penalty")
    p.add_argument("--max-tokens", type=int, default=4000,
                   help="source tokens per batch (x beam in the decoder)")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.beam < 1 or args.max_tokens < 1:
        raise UsageError("--beam and --max-tokens must be at least 1")
    args.device = pick_device(args.device)
    if args.output and not args.eval:
        raise UsageError("--output goes with --eval; otherwise redirect the standard output")

    if args.eval:
        sources, references = map(read_lines, args.eval)
        if len(sources) != len(references):
            raise UsageError(f"{args.eval[0]} has {len(sources)} lines but {args.eval[1]} has "
                                 f"{len(references)}: the files must be aligned line by line")
        sources = blank_lines_stay_blank(sources, args.eval[0])
    elif args.text is not None:
        if not args.text.strip():
            raise UsageError("--text is blank: give the sentence to translate, e.g. --text "
                             "\"Ein Hund rennt.\"")
        sources = [args.text]
    else:
        sources = read_lines(args.file) if args.file else [line.rstrip("\n") for line in sys.stdin]
        sources = blank_lines_stay_blank(sources, args.file or "the standard input")
    model, tokenizer = load_seq2seq_checkpoint(args.ckpt, args.device)  # after the input's checks

    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, args.beam, args.length_penalty,
                           args.max_tokens)
    seconds = time.perf_counter() - start

    if not args.eval:
        print("\n".join(hypotheses))
        return
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(hypotheses) + "\n")
    scores = bleu(hypotheses, references)
    search = (f"beam {args.beam}, length penalty {args.length_penalty}" if args.beam > 1
              else "greedy")
    print(f"sacreBLEU {scores['bleu']:.2f} (lowercase {scores['bleu_lc']:.2f}) on {len(sources)} "
          f"lines, {search}, {seconds:.1f} s; {bleu_signature()}")


if __name__ == "__main__":
    sys.exit(exit_code(main))
