"""Generation speed with and without the KV cache, for several context (prompt) lengths; the KV
cache's size per token for several numbers of key/value heads; and the speed of long generation.

    python scripts/bench_generate.py             # the CPU config's model, random weights
    python scripts/bench_generate.py --ckpt runs/.../best-step=2000.ckpt --contexts 1 32 64 \
        --batch 1 4 16
    python scripts/bench_generate.py --kv-heads 4 1 --config configs/shakespeare_char.yaml
    python scripts/bench_generate.py --long 4000 # learned positions against rotary ones

Each run generates --new-tokens tokens greedily for each batch size after a prompt of each context
length (a context equal to block_size starts full), --repeats times; the best time counts. Prints a
markdown table.

--kv-heads N ...: the same model with each number of key/value heads (grouped-query attention; N =
n_head is multi-head, 1 multi-query) fills its caches with one full context; the table gives the
bytes the caches hold per token, measured on the tensors, and the tokens/s of cached generation.

--long N: N tokens from a one-token prompt with the cache, for learned positions (the context is
cropped to block_size / 2 and the cache rebuilt whenever it fills) and for rotary ones (the cache
rolls: one token per step for ever); the table gives the tokens/s of the first 60 tokens, of the
last 1,000 and of all N.
"""

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

import torch
import yaml

from model import ATTENTION_KERNELS, GPT, GPTConfig, KVCache
from model.checkpoint import load_gpt_checkpoint
from model.device import choose_attn_impl, device_info
from scripts._common import add_device_argument, pick_device

REPO = Path(__file__).resolve().parents[1]


def build_model(args, **options) -> GPT:
    """The checkpoint's model, or the config's shape with random weights and ``options`` (GPTConfig
    fields) on top."""
    if args.ckpt:
        model, _ = load_gpt_checkpoint(args.ckpt)
    else:
        with open(args.config) as f:
            config = yaml.safe_load(f)
        shape = {**config["model"]["config"], "block_size": config["data"]["block_size"],
                 "vocab_size": args.vocab_size, "dropout": 0.0, **options}
        if shape.get("attn_impl") == "auto":  # as train.py would pick it here; decoding is fp32
            shape["attn_impl"] = choose_attn_impl(device_info(args.device), "32-true",
                                                  seq_len=shape["block_size"])
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape))
    if args.attn_impl:
        for block in model.blocks:
            block.attn.attn_impl = args.attn_impl
    return model.to(args.device).eval()


def tokens_per_sec(model, args, batch: int, context: int, use_cache: bool) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=args.device)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.generate(prompt, args.new_tokens, temperature=0, use_cache=use_cache)
        if args.device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch * args.new_tokens / best


def kv_bytes_per_token(model: GPT, device: str) -> int:
    """Bytes the KV caches hold per token, measured on their tensors after one full context."""
    block = model.config.block_size
    caches = [KVCache(block) for _ in model.blocks]
    with torch.inference_mode():
        model(torch.zeros(1, block, dtype=torch.long, device=device), kv_caches=caches)
    return sum(t.element_size() * t.numel() for c in caches for t in c.stored()) // block


def kv_table(args, n_head: int) -> None:
    """Bytes the KV caches hold per token, and cached tokens/s, for each number of kv heads."""
    mha_bytes = kv_bytes_per_token(build_model(args, n_kv_head=n_head), args.device)
    print("| n_kv_head | KV cache bytes per token | smaller than multi-head by | "
          "KV cache tokens/s |")
    print("| --- | --- | --- | --- |")
    for n_kv_head in args.kv_heads:
        model = build_model(args, n_kv_head=n_kv_head)
        per_token = kv_bytes_per_token(model, args.device)
        speed = tokens_per_sec(model, args, 1, model.config.block_size // 2, use_cache=True)
        label = {n_head: " (MHA)", 1: " (MQA)"}.get(n_kv_head, " (GQA)")
        print(f"| {n_kv_head}{label} | {per_token:,} | {mha_bytes / per_token:.2f}x | "
              f"{speed:,.0f} |", flush=True)


def rate(stamps: list[float], first: int, last: int) -> float:
    """Tokens per second from token ``first`` to token ``last``; stamps[i]: when token i was out
    (stamps[0]: the start)."""
    return (last - first) / (stamps[last] - stamps[first])


def long_table(args) -> None:
    """tokens/s along one long cached generation, learned positions against rotary ones."""
    print(f"| positions | tokens/s, first 60 | tokens/s, last 1,000 | tokens/s, all {args.long:,} "
          "| last 1,000 / first 60 |")
    print("| --- | --- | --- | --- | --- |")
    for pos_emb in ("learned", "rope"):
        model = build_model(args, pos_emb=pos_emb)
        prompt = torch.zeros(1, 1, dtype=torch.long, device=args.device)
        best = None
        for _ in range(args.repeats):
            stamps = [time.perf_counter()]
            for _ in model.stream(prompt, args.long, temperature=0):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            if best is None or stamps[-1] - stamps[0] < best[-1] - best[0]:
                best = stamps
        n = args.long
        first60, last, total = (rate(best, 0, min(60, n)), rate(best, n - min(1000, n), n),
                                rate(best, 0, n))
        print(f"| {pos_emb} | {first60:,.0f} | {last:,.0f} | {total:,.0f} | {last / first60:.2f} |",
              flush=True)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
                   help="model shape to build")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of --config")
    p.add_argument("--vocab-size", type=int, default=65,
                   help="with --config (65: Tiny Shakespeare characters)")
    p.add_argument("--attn-impl", default=None, choices=list(ATTENTION_KERNELS),
                   help="override the model's")
    p.add_argument("--contexts", nargs="+", type=int, default=None,
                   help="prompt lengths (default: 1 .. block_size)")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--batch", nargs="+", type=int, default=[1],
                   help="batch sizes (rows generated together)")
    p.add_argument("--repeats", type=int, default=3)
    add_device_argument(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--kv-heads", nargs="+", type=int, default=None,
                   help="instead: the KV cache per token for these numbers of key/value heads")
    p.add_argument("--long", type=int, default=None,
                   help="instead: tokens/s along a generation of this many tokens, learned against "
                        "rotary positions")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.kv_heads or args.long) and args.ckpt:
        raise UsageError("--kv-heads and --long build the --config's shape with random weights; "
                         "leave out --ckpt")
    if args.long is not None and args.long < 1:
        raise UsageError("--long must be at least 1")
    model = build_model(args)
    block = model.config.block_size
    contexts = args.contexts or sorted({1, block // 4, block // 2, block})
    print(f"{args.ckpt or args.config}: {model.num_params() / 1e6:.2f}M params, "
          f"block_size {block}, "
          f"attn_impl {model.blocks[0].attn.attn_impl}, {args.new_tokens} new tokens, "
          f"{device_info(args.device).describe()}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats}\n")
    if args.kv_heads:
        return kv_table(args, model.config.n_head)
    if args.long:
        return long_table(args)
    print("| batch | context | no cache tokens/s | KV cache tokens/s | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batch:
        for context in contexts:
            if context > block:
                continue
            plain = tokens_per_sec(model, args, batch, context, use_cache=False)
            cached = tokens_per_sec(model, args, batch, context, use_cache=True)
            print(f"| {batch} | {context}{' (full)' if context == block else ''} | {plain:,.0f} | "
                  f"{cached:,.0f} | {cached / plain:.1f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_code(main))
