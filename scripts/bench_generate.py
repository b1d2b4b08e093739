"""Generation speed with and without the KV cache, for several context (prompt) lengths.

    python scripts/bench_generate.py             # the CPU config's model, random weights
    python scripts/bench_generate.py --ckpt runs/.../best-step=2000.ckpt --contexts 1 32 64 \
        --batch 1 4 16

Each run generates --new-tokens tokens greedily for each batch size after a prompt of each context
length (a context equal to block_size starts full), --repeats times; the best time counts. Prints a
markdown table.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import torch
import yaml

from model import ATTENTION_KERNELS, GPT, GPTConfig
from model.checkpoint import load_gpt_checkpoint
from model.device import choose_attn_impl, device_info
from scripts._common import add_device_argument, exit_code, pick_device

REPO = Path(__file__).resolve().parents[1]


def build_model(args) -> GPT:
    if args.ckpt:
        model, _ = load_gpt_checkpoint(args.ckpt)
    else:
        with open(args.config) as f:
            config = yaml.safe_load(f)
        shape = {**config["model"]["config"], "block_size": config["data"]["block_size"],
                 "vocab_size": args.vocab_size, "dropout": 0.0}
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    block = model.config.block_size
    contexts = args.contexts or sorted({1, block // 4, block // 2, block})
    print(f"{args.ckpt or args.config}: {model.num_params() / 1e6:.2f}M params, "
          f"block_size {block}, "
          f"attn_impl {model.blocks[0].attn.attn_impl}, {args.new_tokens} new tokens, "
          f"{device_info(args.device).describe()}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats}\n")
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
