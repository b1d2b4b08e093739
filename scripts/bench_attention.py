"""Forward + backward time and peak memory of every attention path across sequence lengths.

    python scripts/bench_attention.py                             # CPU, fp32, T = 128 ... 4096
    python scripts/bench_attention.py --paths naive sdpa --seq-lens 512 1024 --threads 1
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --seq-lens 1024 4096 16384
    python scripts/bench_attention.py --paths tiled sdpa --windows none 256 --seq-lens 1024 16384

Causal self-attention on random (batch, heads, T, head_dim) inputs, full or (--windows) each query
seeing only its latest W keys: a path then appears once per window, e.g. "tiled w256". Time is the
median of
``--repeats`` fwd+bwd calls after ``--warmup``; peak memory is what one fwd+bwd adds on top of its
inputs (CUDA: the allocator's peak; CPU: the peak resident size of a fresh process after one small
warm-up pass, so neither memory freed by earlier runs nor one-time allocations blur it). Prints
markdown tables, writes a PNG plot (time and memory against T, log scales) and, with --json, the
raw figures.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import ArgumentParser, exit_at_once_on_ctrl_c, exit_code  # isort: split

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import torch

from model import ATTENTION_KERNELS
from scripts._common import add_device_argument, pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", nargs="+", default=list(ATTENTION_KERNELS),
                   choices=list(ATTENTION_KERNELS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--windows", nargs="+", type=window_arg, default=[None], metavar="W",
                   help="sliding windows to measure each path with; 'none' is full causal")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    add_device_argument(p)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="skip a run whose T x T matrices alone would need more than this")
    p.add_argument("--plot", default="bench_attention.png", help="PNG to write ('' for none)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--measure-memory", nargs=3, metavar=("PATH", "W", "T"),  # a child's mode
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def window_arg(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a window is a number of keys >= 1 or 'none', not "
                                         f"{text!r}")
    return int(text)


def label(path: str, window: int | None) -> str:
    return path if window is None else f"{path} w{window}"


def fwd_bwd(args, path: str, T: int, window: int | None = None):
    """Make the inputs, then return a function that runs one forward + backward pass on them."""
    shape = (args.batch, args.heads, T, args.head_dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=DTYPES[args.dtype], requires_grad=True)
               for _ in range(3))

    def run():
        y = ATTENTION_KERNELS[path](q, k, v, causal=True, key_mask=None, dropout_p=0.0,
                                    window=window if window is not None and window < T else None)
        y.backward(torch.ones_like(y))

    return run


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(args, path: str, T: int, window: int | None) -> float:
    run = fwd_bwd(args, path, T, window)
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        run()
        sync(args.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _rss_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(x for x in status if x.startswith(field))
    return int(line.split()[1]) * 1024


def peak_mib_here(args, path: str, T: int, window: int | None) -> float:
    """Peak memory one fwd+bwd adds, measured in this process."""
    run = fwd_bwd(args, path, T, window)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    fwd_bwd(args, path, min(T, 64), window)()  # one-time allocations (thread pools, autograd)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident size
    base = _rss_bytes("VmRSS:")
    run()
    return (_rss_bytes("VmHWM:") - base) / 2**20


def peak_mib(args, argv, path: str, T: int, window: int | None) -> float:
    if args.device.startswith("cuda"):
        return peak_mib_here(args, path, T, window)
    child = subprocess.run([sys.executable, __file__, *argv, "--measure-memory", path,
                            str(window).lower(), str(T)],
                           capture_output=True, text=True, check=True)
    return float(child.stdout.strip().splitlines()[-1])


def too_big(args, path: str, T: int) -> bool:
    """The reference holds T x T matrices (scores, weights and their gradients: about 4), with a
    window or not."""
    itemsize = torch.finfo(DTYPES[args.dtype]).bits // 8
    scores_bytes = 4 * args.batch * args.heads * T * T * itemsize
    return path == "naive" and scores_bytes > args.max_memory_gb * 2**30


def markdown(results, paths, seq_lens, key, unit, fmt) -> str:
    """One row per T, one column per path (label); times also as a speed-up over the reference."""
    header = "| T | " + " | ".join(f"{p} {unit}" for p in paths) + " |"
    lines = [header, "|" + " --- |" * (len(paths) + 1)]
    for T in seq_lens:
        cells = []
        for p in paths:
            r = results.get((p, T))
            if r is None:
                cells.append("skipped")
                continue
            cell = fmt.format(r[key])
            ref = results.get(("naive", T))
            if key == "ms" and ref is not None and p != "naive":
                cell += f" ({ref['ms'] / r['ms']:.1f}x)"
            cells.append(cell)
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(results, paths, seq_lens) -> str:
    """How time and memory grow when T doubles: about 2x is linear in T, about 4x quadratic."""
    lines = ["| T | " + " | ".join(f"{p} time, memory" for p in paths) + " |",
             "|" + " --- |" * (len(paths) + 1)]
    for T in seq_lens:
        if T % 2 or T // 2 not in seq_lens:
            continue
        cells = []
        for p in paths:
            now, before = results.get((p, T)), results.get((p, T // 2))
            cells.append(f"{now['ms'] / before['ms']:.2f}x, {now['mib'] / before['mib']:.2f}x"
                         if now and before and before["mib"] > 0 else "-")
        lines.append(f"| {T // 2} -> {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, paths, path_png: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in paths:
        pts = sorted((T, r) for (q, T), r in results.items() if q == p)
        if not pts:
            continue
        Ts = [T for T, _ in pts]
        axes[0].plot(Ts, [r["ms"] for _, r in pts], marker="o", label=p)
        axes[1].plot(Ts, [max(r["mib"], 1e-2) for _, r in pts], marker="o", label=p)
    for ax, ylabel in zip(axes, ("fwd+bwd time (ms)", "peak memory added (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:  # child process: one memory measurement, printed last
        path, window, T = args.measure_memory
        print(f"{peak_mib_here(args, path, int(T), window_arg(window)):.3f}")
        return
    title = (f"causal attention fwd+bwd, {args.device} {args.dtype}, batch {args.batch}, heads "
             f"{args.heads}, head dim {args.head_dim}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}")
    print(title + "\n")
    results = {}
    labels = [label(path, window) for window in args.windows for path in args.paths]
    for T in args.seq_lens:
        for window in args.windows:
            for path in args.paths:
                if too_big(args, path, T):
                    continue
                try:
                    results[(label(path, window), T)] = {
                        "ms": time_ms(args, path, T, window),
                        "mib": peak_mib(args, argv, path, T, window)}
                except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
                    print(f"{label(path, window)} at T={T}: skipped "
                          f"({str(e).splitlines()[0][:120]})", flush=True)
    print(markdown(results, labels, args.seq_lens, "ms", "ms", "{:.1f}"))
    print()
    print(markdown(results, labels, args.seq_lens, "mib", "MiB", "{:.1f}"))
    if any(T // 2 in args.seq_lens for T in args.seq_lens if T % 2 == 0):
        print("\nGrowth when T doubles (2x: linear in T; 4x: quadratic)\n")
        print(growth(results, labels, args.seq_lens))
    if args.plot:
        plot(results, labels, args.plot, title)
        print(f"\nplot: {args.plot}")
    if args.json:
        records = [{"path": p, "T": T, **r} for (p, T), r in results.items()]
        Path(args.json).write_text(json.dumps({"title": title, "results": records}, indent=1))


if __name__ == "__main__":
    sys.exit(exit_code(main))
