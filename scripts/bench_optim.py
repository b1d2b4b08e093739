"""Time of one optimizer step, against a forward and backward pass of the same model: AdamW alone,
and Muon for the blocks' matrices (AdamW beside it) with its Newton-Schulz iterations in fp32
(model/optim.py) or in bf16 (PyTorch's own step). It shows what Muon costs per step on this device,
and why train.py runs the iterations in fp32 on a CPU without bf16.

    python scripts/bench_optim.py                               # the CPU recipe's shape
    python scripts/bench_optim.py --n-layer 6 --n-embd 384 --n-head 6 --batch 64 --block 256 \\
        --device cuda
    python scripts/bench_optim.py --seq2seq --n-layer 3 --n-embd 256 --vocab 8000 --batch 60 \\
        --block 25 --ns-steps 5 3            # configs/multi30k_de_en.yaml's shape and batches
    python scripts/bench_optim.py --seq2seq ... --compile   # and the pass compiled: would it pay?

Prints a markdown table and the machine it ran on. Big CPU tensors are kept for reuse, as train.py
keeps them (training/memory.py: keep_freed_memory); ``MALLOC_MMAP_THRESHOLD_=33554432`` in the
environment times glibc's default instead. The Newton-Schulz work is per matrix, whatever
the batch: its share of a step shrinks as the batch grows.
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

from model import GPT, GPTConfig, Seq2SeqConfig, Seq2SeqTransformer
from model.device import device_info
from model.optim import build_optimizer, hidden_matrices
from scripts._common import add_device_argument, pick_device
from training.memory import keep_freed_memory


def timed(step, device: str, repeats: int) -> float:
    """Milliseconds per call of ``step``, the best of ``repeats`` rounds of 5 after 2 warm-ups."""
    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 5 * 1000)
    return best


def optimizers(model: torch.nn.Module, device: str, ns_steps: list[int]
               ) -> dict[str, torch.optim.Optimizer]:
    """Training's optimizers (model/optim.py), Muon's with each count of iterations in fp32 and in
    bf16."""
    def build(optimizer: str, **muon) -> torch.optim.Optimizer:
        return build_optimizer(model, optimizer, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                               fused=device in ("cpu", "cuda"), **muon)

    found = {"AdamW (fused), every parameter": build("adamw")}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16 (PyTorch's)")):
        for steps in ns_steps:
            found[f"Muon, {steps} Newton-Schulz iterations in {name}, + AdamW"] = \
                build("muon", muon_ns_steps=steps, ns_dtype=dtype)
    return found


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65, help="65: Tiny Shakespeare's characters")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seq2seq", action="store_true",
                   help="the translation model instead of a GPT: --n-layer encoder and as many "
                        "decoder blocks, MLP 2 x --n-embd wide (the translation config's), "
                        "--batch pairs of --block tokens a side")
    p.add_argument("--ns-steps", type=int, nargs="+", default=[5],
                   help="Muon's Newton-Schulz iterations, a row for each (default: 5, PyTorch's)")
    p.add_argument("--compile", action="store_true",
                   help="also time the forward and backward pass of the model compiled with "
                        "torch.compile, and how long compiling took")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    keep_freed_memory()  # as train.py: big tensors reused between steps, not paged in each time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if min(args.ns_steps) < 1:
        raise UsageError(f"--ns-steps must be 1 or more, got {args.ns_steps}")
    idx = torch.randint(0, args.vocab, (args.batch, args.block), device=device)
    if args.seq2seq:
        config = Seq2SeqConfig(vocab_size=args.vocab, max_len=args.block,
                               n_encoder_layer=args.n_layer, n_decoder_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd, mlp_hidden=2 * args.n_embd,
                               dropout=0.0)
        model = Seq2SeqTransformer(config).to(device)
    else:
        config = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, bias=False)
        model = GPT(config).to(device)

    def forward_backward(module: torch.nn.Module = model):
        model.zero_grad(set_to_none=True)
        # a GPT reads idx and predicts it; the translation model reads it on both sides
        loss = module(idx, idx, idx)[1] if args.seq2seq else module(idx, idx)[1]
        loss.backward()

    pass_ms = timed(forward_backward, device, args.repeats)  # leaves gradients for the steps
    rows = [("forward + backward", pass_ms, "")]
    if args.compile:  # the same weights behind a compiled forward: its first call compiles
        compiled = torch.compile(model)
        start = time.perf_counter()
        forward_backward(compiled)
        seconds = time.perf_counter() - start
        ms = timed(lambda: forward_backward(compiled), device, args.repeats)
        rows.append((f"forward + backward, compiled (compiling: {seconds:.0f} s)", ms, ""))
    for name, optimizer in optimizers(model, device, args.ns_steps).items():
        ms = timed(optimizer.step, device, args.repeats)
        rows.append((name, ms, f"{100 * ms / (pass_ms + ms):.0f}%"))
    matrices = len(hidden_matrices(model))
    layers = f"{args.n_layer} + {args.n_layer}" if args.seq2seq else f"{args.n_layer}"
    print(f"{type(model).__name__}, {layers} layers x {args.n_embd} dims ({matrices} block "
          f"matrices for Muon), batch {args.batch} x {args.block} tokens"
          f"{' a side' if args.seq2seq else ''}, on {device_info(device).describe()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| what | ms | share of a training step |\n| --- | --- | --- |")
    for name, ms, share in rows:
        print(f"| {name} | {ms:.2f} | {share} |")


if __name__ == "__main__":
    sys.exit(exit_code(main))
