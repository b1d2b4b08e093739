"""Plot the attention maps of a trained model as PNG heatmaps, with the tokens on the axes.

    python scripts/plot_attention.py --ckpt runs/mini-gpt/<run>/checkpoints/last.ckpt \
        --text "ROMEO:" --layer 3
    python scripts/plot_attention.py --ckpt <gpt>.ckpt --text "ROMEO:" --head 0   # every layer
    python scripts/plot_attention.py --ckpt <gpt>.ckpt --text "ROMEO:" --layer 0 --average
    python scripts/plot_attention.py --ckpt <seq2seq>.ckpt --text "Ein Hund rennt im Schnee."
    python scripts/plot_attention.py --ckpt <seq2seq>.ckpt --text "Ein Hund rennt." --attention self

GPT: the causal self-attention over the text (each row a query token, each column a key token).
Seq2seq: the model translates the text (beam search), then one forward pass over the source and its
translation records the decoder's cross-attention (its input tokens, bos then the translation, each
row predicting the next token, against the source tokens) or its causal self-attention. The weights
come from ``model.capture_attention`` (the reference path, whatever path the model was trained
with). By default, every head of the last layer; --head H shows one head in every layer, --average
the mean of a layer's heads.
"""

import math
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

import torch

from model import beam_search, capture_attention, greedy_search
from model.checkpoint import load_checkpoint
from scripts._common import add_device_argument, pick_device


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token as text, with spaces and line breaks made visible."""
    return [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "·") or "∅" for i in ids]


def gpt_maps(model, tokenizer, text: str) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Per layer (nh, T, T) weights of the causal self-attention over ``text``, and the token
    labels."""
    ids = tokenizer.encode(text)[-model.config.block_size:]
    if not ids:
        raise UsageError("--text is empty: give a prompt to look at")
    with torch.no_grad(), capture_attention(model) as weights:
        model(torch.tensor([ids], device=next(model.parameters()).device))
    layers = [weights[f"blocks.{i}.attn"][0] for i in range(model.config.n_layer)]
    labels = token_labels(tokenizer, ids)
    return layers, labels, labels


def gpt_attention(config) -> str:
    """The kind of self-attention a GPT config has, in words, for the figure's title."""
    words = ["causal self-attention"]
    if config.window is not None:
        words.append(f"sliding window of {config.window}")
    if config.n_kv_head not in (None, config.n_head):
        words.append(f"{config.n_head} query heads sharing {config.n_kv_head} key/value heads")
    if config.pos_emb == "rope":
        words.append("rotary positions")
    if config.qk_norm:
        words.append("QK-norm")
    return ", ".join(words)


def seq2seq_maps(model, tokenizer, text: str, attention: str, beam: int):
    """Per decoder layer (nh, T_tgt, T_src) cross-attention (or (nh, T_tgt, T_tgt) self-attention)
    for the model's own translation of ``text``, and the labels of the rows and columns."""
    config, device = model.config, next(model.parameters()).device
    src_ids = tokenizer.encode(text)
    if not src_ids or len(src_ids) > config.max_len:
        raise UsageError(f"--text must be 1 to {config.max_len} tokens long, got {len(src_ids)}")
    src = torch.tensor([src_ids], device=device)
    with torch.no_grad():
        hyp = (greedy_search(model, src) if beam == 1 else beam_search(model, src, beam))[0]
        tgt_in = [config.bos_id, *hyp][:config.max_len]
        with capture_attention(model) as weights:
            model(src, torch.tensor([tgt_in], device=device))
    name = "cross_attn" if attention == "cross" else "attn"
    layers = [weights[f"decoder.{i}.{name}"][0] for i in range(config.n_decoder_layer)]
    rows = ["<bos>", *token_labels(tokenizer, hyp)][:len(tgt_in)]
    print(f"translation: {tokenizer.decode(hyp)}")
    return layers, rows, token_labels(tokenizer, src_ids) if attention == "cross" else rows


def select(layers: list[torch.Tensor], layer: int | None, head: int | None, average: bool,
           n_kv_head: int | None = None):
    """(title, (rows, cols) map) pairs: one head across layers, the mean of a layer's heads, or
    its heads. With grouped-query attention (n_kv_head < n_head) each title names the key/value
    head its query head shares."""
    n_layer, n_head = len(layers), layers[0].size(0)
    group = n_head // (n_kv_head or n_head)

    def name(h: int) -> str:
        return f"head {h}" + (f" (kv head {h // group})" if group > 1 else "")

    if layer is not None and not -n_layer <= layer < n_layer:
        raise UsageError(f"--layer {layer}: the model has {n_layer} layers (0 to {n_layer - 1})")
    if head is not None and not 0 <= head < n_head:
        raise UsageError(f"--head {head}: the model has {n_head} heads (0 to {n_head - 1})")
    if head is not None and (layer is not None or average):
        raise UsageError("--head shows one head in every layer; leave out --layer and --average")
    if head is not None:
        return [(f"layer {i}, {name(head)}", w[head]) for i, w in enumerate(layers)]
    index = n_layer - 1 if layer is None else layer % n_layer
    if average:
        return [(f"layer {index}, mean of {n_head} heads", layers[index].mean(0))]
    return [(f"layer {index}, {name(h)}", layers[index][h]) for h in range(n_head)]


def plot(maps, rows: list[str], cols: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = math.ceil(math.sqrt(len(maps)))  # a square-ish grid
    nrows = math.ceil(len(maps) / ncols)
    size = max(3.0, 0.22 * max(len(rows), len(cols)) + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(maps):]:
        ax.axis("off")
    for ax, (name, weights) in zip(axes.flat, maps, strict=False):
        image = ax.imshow(weights.float().cpu(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize="small")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="a checkpoint written by train.py (GPT or seq2seq)")
    p.add_argument("--text", required=True, help="GPT: the prompt; seq2seq: the source sentence")
    p.add_argument("--layer", type=int, default=None,
                   help="the layer whose heads to plot (default: the last)")
    p.add_argument("--head", type=int, default=None, help="plot this head in every layer instead")
    p.add_argument("--average", action="store_true", help="plot the mean of the layer's heads")
    p.add_argument("--attention", choices=["cross", "self"], default="cross",
                   help="seq2seq: the decoder's cross-attention (default) or its causal "
                        "self-attention")
    p.add_argument("--beam", type=int, default=4,
                   help="seq2seq: beam size of the translation (1 = greedy)")
    p.add_argument("--out", default="attention.png", help="where to write the PNG")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.beam < 1:
        raise UsageError("--beam must be at least 1")
    model, tokenizer, kind = load_checkpoint(args.ckpt, pick_device(args.device))
    if kind == "gpt":
        layers, rows, cols = gpt_maps(model, tokenizer, args.text)
        title = f"{gpt_attention(model.config)} (rows: queries, columns: keys)"
    else:
        layers, rows, cols = seq2seq_maps(model, tokenizer, args.text, args.attention, args.beam)
        rows_are = "rows: the decoder's input tokens, each predicting the next"
        if args.attention == "cross":
            title = f"decoder cross-attention ({rows_are}; columns: source tokens)"
        else:
            title = f"decoder causal self-attention ({rows_are}; columns: keys)"
    plot(select(layers, args.layer, args.head, args.average, model.config.n_kv_head), rows, cols,
         args.out, title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(exit_code(main))
