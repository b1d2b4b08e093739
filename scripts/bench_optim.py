"""Time of one optimizer step, against a forward and backward pass of the same model: AdamW alone,
and Muon for the blocks' matrices (AdamW beside it) with its Newton-Schulz iterations in fp32
(model/optim.py) or in bf16 (PyTorch's own step). It shows what Muon costs per step on this device,
and why train.py runs the iterations in fp32 on a CPU without bf16.

    python scripts/bench_optim.py                               # the CPU recipe's shape
    python scripts/bench_optim.py --n-layer 6 --n-embd 384 --n-head 6 --batch 64 --block 256 \\
        --device cuda

Prints a markdown table and the machine it ran on. The Newton-Schulz work is per matrix, whatever
the batch: its share of a step shrinks as the batch grows.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import torch

from model import GPT, GPTConfig
from model.device import device_info
from model.optim import CombinedOptimizer, Muon
from scripts._common import add_device_argument, exit_code, pick_device
from train import hidden_matrices, param_groups


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


def optimizers(model: GPT, device: str) -> dict[str, torch.optim.Optimizer]:
    fused = device in ("cpu", "cuda")
    hidden = hidden_matrices(model)

    def adamw(exclude=()):
        return torch.optim.AdamW(param_groups(model, 0.1, exclude=exclude), lr=1e-3, fused=fused)

    return {"AdamW (fused), every parameter": adamw(),
            "Muon, Newton-Schulz in fp32, + AdamW": CombinedOptimizer(
                adamw(hidden), Muon(hidden, lr=0.02, ns_dtype=torch.float32)),
            "Muon, Newton-Schulz in bf16 (PyTorch's), + AdamW": CombinedOptimizer(
                adamw(hidden), Muon(hidden, lr=0.02, ns_dtype=torch.bfloat16))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65, help="65: Tiny Shakespeare's characters")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_device_argument(p)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, bias=False)
    model = GPT(config).to(device)
    idx = torch.randint(0, args.vocab, (args.batch, args.block), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(idx, idx)[1].backward()

    pass_ms = timed(forward_backward, device, args.repeats)  # leaves gradients for the steps
    rows = [("forward + backward", pass_ms, "")]
    for name, optimizer in optimizers(model, device).items():
        ms = timed(optimizer.step, device, args.repeats)
        rows.append((name, ms, f"{100 * ms / (pass_ms + ms):.0f}%"))
    matrices = len(hidden_matrices(model))
    print(f"{args.n_layer} layers x {args.n_embd} dims ({matrices} block matrices for Muon), batch "
          f"{args.batch} x {args.block} tokens, on {device_info(device).describe()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| what | ms | share of a training step |\n| --- | --- | --- |")
    for name, ms, share in rows:
        print(f"| {name} | {ms:.2f} | {share} |")


if __name__ == "__main__":
    sys.exit(exit_code(main))
