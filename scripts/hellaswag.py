"""Score a GPT checkpoint on HellaSwag: which of 4 endings it finds likeliest after a context.

    python scripts/hellaswag.py runs/mini-gpt/<run>/checkpoints/last.ckpt
    python scripts/hellaswag.py gpt2 --batch-size 16 --out gpt2-hellaswag.json
    python scripts/hellaswag.py model.ckpt --data hellaswag_val.jsonl --limit 500 --device cpu

CHECKPOINT is anything scripts/sample.py's ``--init-from`` takes: a checkpoint written by train.py,
a published GPT-2 (``gpt2`` ... ``gpt2-xl``, with ``pip install -e '.[hf]'``) or a Hugging Face
GPT-2 folder; the tokenizer is the checkpoint's. The items are the hub dataset Rowan/hellaswag's
validation split (10,042 items; downloaded once into the Hugging Face cache, read from there
offline) or a local JSONL file (``--data``), in rowanz/hellaswag's format or the hub's.

Scoring is nanoGPT's and llm.c's (completion style, no prompt): each ending, after the context and
a space, goes through the model, and its score is the cross-entropy of the ending's tokens alone.
``acc`` picks the ending with the lowest sum of its tokens' losses, ``acc_norm`` the lowest mean
(per token), which does not favour short endings. GPT-2 124M: acc_norm about 0.294.
"""

import json
import sys
import time
from dataclasses import dataclass
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
import torch.nn.functional as F

from data.corpus import DataSourceError, load_hub
from model.checkpoint import load_model
from scripts._common import add_device_argument, pick_device
from training.memory import keep_freed_memory

HUB_DATASET = "Rowan/hellaswag"
# our split names -> load_hub's (the test split is left out: its labels are not published)
SPLITS = {"validation": "val", "train": "train"}
NUM_ENDINGS = 4
WHERE_TO_GET_IT = ("--data path/to/hellaswag_val.jsonl (rowanz/hellaswag's data/hellaswag_val.jsonl"
                   ": https://github.com/rowanz/hellaswag/tree/master/data, or the hub dataset "
                   f"{HUB_DATASET}'s validation split saved as JSONL where there is a network)")
PROGRESS_EVERY_S = 10.0


@dataclass
class Item:
    ctx: str
    endings: list[str]
    label: int
    where: str  # how error messages name it: "item 3 (line 4 of val.jsonl)"


# ------------------------------------------------------------------------------------------------
# The items


def check_item(row, where: str) -> Item:
    """A HellaSwag item from a parsed row of either format (rowanz/hellaswag's JSONL: ``label`` an
    int; the hub's: a string), or a DataSourceError naming ``where`` and what is wrong."""
    def bad(problem: str) -> DataSourceError:
        return DataSourceError(f"{where}: {problem}; a HellaSwag item has 'ctx' (a string), "
                               f"'endings' (a list of {NUM_ENDINGS} strings) and 'label' (the "
                               f"index of the right ending)")

    if not isinstance(row, dict):
        raise bad(f"it is a JSON {type(row).__name__}, not an object")
    missing = [key for key in ("ctx", "endings", "label") if key not in row]
    if missing:
        raise bad(f"no {', '.join(repr(key) for key in missing)}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx:
        raise bad(f"'ctx' is {ctx!r}, not a non-empty string")  # (nothing to predict from)
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise bad(f"'endings' is {endings!r:.80}, not a list of strings")
    if len(endings) != NUM_ENDINGS:
        raise bad(f"it has {len(endings)} endings, not {NUM_ENDINGS}")
    if isinstance(label, str) and label.strip().isdecimal():  # the hub's labels are strings: "2"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise bad(f"'label' is {label!r}, not one of 0 to {NUM_ENDINGS - 1}")
    return Item(ctx, endings, label, where)


def read_jsonl(path: str) -> list[Item]:
    """The items of a local JSONL file, one per non-blank line."""
    if not Path(path).is_file():
        raise DataSourceError(f"--data {path}: no such file; pass a HellaSwag JSONL file, e.g. "
                              f"{WHERE_TO_GET_IT.removeprefix('--data ')}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataSourceError(f"cannot read {path}: it is not UTF-8 text ({e.reason})") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"item {len(items)} (line {number} of {path})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{where}: not JSON ({e.msg}); --data takes JSONL, one item "
                                  f"per line") from None
        items.append(check_item(row, where))
    if not items:
        raise DataSourceError(f"{path} holds no items (it is empty); pass a HellaSwag JSONL file")
    return items


def load_items(data: str | None, split: str) -> tuple[list[Item], str]:
    """The items to score and how the report names them: ``data``'s (a local JSONL file), or the
    hub dataset's ``split``. Offline with the dataset not in the cache, a DataSourceError at once
    (``load_hub``), saying to pass --data."""
    if data is not None:
        return read_jsonl(data), Path(data).name
    splits = load_hub(HUB_DATASET, hint=WHERE_TO_GET_IT)
    if SPLITS[split] not in splits:
        raise DataSourceError(f"{HUB_DATASET} has no {split} split here; pass {WHERE_TO_GET_IT}")
    rows = splits[SPLITS[split]]
    return [check_item(row, f"item {i} of {HUB_DATASET} {split}")
            for i, row in enumerate(rows)], split


# ------------------------------------------------------------------------------------------------
# Tokens and scores: small functions the tests call


def item_tokens(tokenizer, ctx: str, endings: list[str], block_size: int):
    """The rows of one item, one per ending, as tokens (E, T) and ending mask (E, T), padded on the
    right to the longest row (T <= block_size). A row is the context's tokens and then the ending's
    (encoded as " " + ending, apart from the context, as nanoGPT and llm.c do); mask is True at the
    ending's tokens, the ones scored. Raises ValueError for text the tokenizer cannot encode, or an
    ending too long for the model."""
    ctx_ids = tokenizer.encode(ctx)
    rows, ends = [], []
    for ending in endings:
        end_ids = tokenizer.encode(" " + ending)
        if not end_ids:
            raise ValueError(f"the ending {ending!r} is no tokens at all: nothing to score")
        if len(end_ids) >= block_size:
            raise ValueError(f"an ending is {len(end_ids)} tokens long; this model reads at most "
                             f"{block_size} (its block_size), context included")
        # a row too long for the model keeps its last block_size tokens: the whole ending and as
        # much of the context as fits before it (the part nearest the ending, which matters most)
        rows.append((ctx_ids + end_ids)[-block_size:])
        ends.append(len(end_ids))
    T = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)  # padding: token 0, never scored
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, ends, strict=True)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(row) - n:len(row)] = True
    return tokens, mask


def pad_right(tensors: list[torch.Tensor], T: int) -> torch.Tensor:
    """(E_i, T_i) tensors -> one (sum of E_i, T) tensor, each padded on the right with zeros."""
    return torch.cat([F.pad(t, (0, T - t.shape[1])) for t in tensors])


@torch.inference_mode()
def score_item(model, tokens: torch.Tensor, mask: torch.Tensor):
    """Each row's ending losses (nats), summed and averaged over its tokens: (N,) and (N,), for
    tokens and mask (N, T) of one item or several (``item_tokens``, ``pad_right``).

    Right padding changes nothing: attention is causal, so the tokens of a row never see the
    padding after them, and padded positions are out of the mask."""
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits, _ = model(tokens)  # (N, T, vocab)
    # token t is predicted at position t - 1; only the ending's positions, so that the float32
    # copy for the cross-entropy is of those alone (the endings' share of the logits, not all)
    scored = mask[:, 1:]  # (N, T - 1)
    losses = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored],
                             reduction="none")  # (M,): M ending tokens in all
    row_of = scored.nonzero()[:, 0]  # (M,): the row of each
    sums = torch.zeros(len(tokens), device=device).index_add_(0, row_of, losses)  # (N,)
    counts = scored.sum(1)  # (N,)
    return sums.cpu(), (sums / counts).cpu()


def choose(scores: torch.Tensor) -> torch.Tensor:
    """The ending each item picks, (B,), from scores (B, E) or (E,) -> (): the lowest loss (the
    first of equal ones)."""
    return scores.argmin(dim=-1)


def tokenize_items(tokenizer, items: list[Item], block_size: int) -> list:
    """``item_tokens`` of each item; an item that cannot be tokenized is a UsageError naming it
    (and how many more cannot), before anything is scored."""
    tokenized, failed = [], []
    for item in items:
        try:
            tokenized.append(item_tokens(tokenizer, item.ctx, item.endings, block_size))
        except ValueError as e:
            failed.append((item, e))
    if failed:
        item, e = failed[0]
        more = f" (and {len(failed) - 1} more of the {len(items)} items)" if failed[1:] else ""
        hint = (": a character model reads only the characters of its training text"
                if getattr(tokenizer, "name", None) == "char" and "vocabulary" in str(e) else "")
        raise UsageError(f"{item.where} cannot be scored: {e}{more}{hint}")
    return tokenized


def evaluate(model, tokenized: list, labels: list[int], batch_size: int,
             progress=None) -> dict:
    """acc and acc_norm over the items, ``batch_size`` items a forward pass; ``progress(done,
    correct, correct_norm)`` is called after each batch."""
    correct = correct_norm = 0
    for start in range(0, len(tokenized), batch_size):
        batch = tokenized[start:start + batch_size]
        T = max(tokens.shape[1] for tokens, _ in batch)
        tokens = pad_right([t for t, _ in batch], T)  # (B * E, T)
        mask = pad_right([m for _, m in batch], T)
        sums, means = score_item(model, tokens, mask)  # (B * E,) each
        truth = torch.tensor(labels[start:start + len(batch)])  # (B,)
        correct += (choose(sums.view(len(batch), -1)) == truth).sum().item()
        correct_norm += (choose(means.view(len(batch), -1)) == truth).sum().item()
        if progress:
            progress(start + len(batch), correct, correct_norm)
    n = len(tokenized)
    return {"items": n, "acc": correct / n, "acc_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm}


# ------------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint written by train.py, gpt2 (-medium, -large, -xl), or a "
                        "Hugging Face GPT-2 folder")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="a local HellaSwag JSONL file (rowanz/hellaswag's hellaswag_val.jsonl, or "
                        f"the hub's format); without it, the hub dataset {HUB_DATASET}")
    p.add_argument("--split", choices=list(SPLITS), default=None,
                   help=f"the split of {HUB_DATASET} (default validation; its test split has no "
                        "labels)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N items")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help=f"items per forward pass (each is {NUM_ENDINGS} rows, one per ending)")
    add_device_argument(p)
    p.add_argument("--out", metavar="FILE.json", default=None,
                   help="also write the results here as JSON, to compare runs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise UsageError("--limit and --batch-size must be at least 1")
    if args.data is not None and args.split is not None:
        raise UsageError(f"--split picks a split of {HUB_DATASET}; --data is one split already: "
                         "leave --split out")
    args.device = pick_device(args.device)
    if args.device == "cpu":  # a batch's logits (100s of MB) reused, not paged in at every batch
        keep_freed_memory()  # (training/memory.py; 1.4x faster for a small model)
    # the items first, checked: a missing file or bad item ends the command before the model loads
    items, name = load_items(args.data, args.split or "validation")
    items = items[:args.limit]
    model, tokenizer, _ = load_model(args.checkpoint, args.device, kind="gpt")
    if tokenizer is None:
        raise UsageError(f"{args.checkpoint} has a vocabulary of {model.config.vocab_size} tokens "
                         f"and no tokenizer this project knows (GPT-2's has 50257), so the items "
                         f"cannot be encoded for it")
    # at most block_size tokens a row, for every kind of positions: a learned table has no more,
    # and a rotary model never saw more than block_size tokens at once in training
    tokenized = tokenize_items(tokenizer, items, model.config.block_size)

    print(f"hellaswag {name}: scoring {len(items)} items with {args.checkpoint} on "
          f"{args.device}", file=sys.stderr, flush=True)
    start = last = time.perf_counter()

    def progress(done, correct, correct_norm):
        nonlocal last
        if time.perf_counter() - last >= PROGRESS_EVERY_S and done < len(items):
            last = time.perf_counter()
            print(f"hellaswag {name}: {done}/{len(items)} items, acc {correct / done:.4f}, "
                  f"acc_norm {correct_norm / done:.4f}, {last - start:.0f} s", file=sys.stderr,
                  flush=True)

    results = evaluate(model, tokenized, [item.label for item in items], args.batch_size,
                       progress)
    seconds = time.perf_counter() - start
    print(f"hellaswag {name}: {results['items']} items, acc {results['acc']:.4f}, acc_norm "
          f"{results['acc_norm']:.4f} ({args.checkpoint})")
    if args.out:
        data = args.data or f"{HUB_DATASET} {args.split or 'validation'}"
        Path(args.out).write_text(json.dumps(
            {"checkpoint": args.checkpoint, "data": data, **results,
             "seconds": round(seconds, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(exit_code(main))
