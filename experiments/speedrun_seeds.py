"""A speedrun record's statistics: one config trained with several seeds, one whole command after
another, and the time to its target loss from each command's start (``target/command_time_s``),
the training time and the final val loss, with their mean and spread, as a Markdown table.

    python experiments/speedrun_seeds.py configs/speedrun_char_cpu.yaml --seeds 1337 1338 1339
    python experiments/speedrun_seeds.py configs/speedrun_char_gpu.yaml --threads 0 --core -1

Each command runs with OMP_NUM_THREADS=--threads (0: PyTorch's default) and, where ``taskset``
exists, on core --core alone (default 0; -1: any core). Run nothing else on the machine meanwhile.
Arguments after ``--`` go to every train.py command.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(config: str, seed: int, threads: int, core: int | None, save_dir: Path,
             extra: list[str]) -> dict:
    """One whole train.py command; its target/* metrics, the shell's view of its length, and
    its last val/loss."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    prefix = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    name = f"seed{seed}"
    command = [*prefix, sys.executable, "train.py", "fit", "--config", config,
               "--seed_everything", str(seed), "--run.save_dir", str(save_dir),
               "--run.name", name, *extra]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"seed {seed} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    metrics, = save_dir.glob(f"*/{name}-*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    result = {k: float(v) for row in rows for k, v in row.items() if k.startswith("target/") and v}
    losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return {"seed": seed, "whole_s": whole, "final_val": losses[-1] if losses else None, **result}


def spread(values: list[float], digits: int = 2) -> str:
    """mean ± standard deviation (min, max)."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} "
            f"(min {min(values):.{digits}f}, max {max(values):.{digits}f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (0: leave it)")
    p.add_argument("--core", type=int, default=0, help="taskset core (-1: none)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: every train.py command's
    args = p.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    core = None if args.core < 0 else args.core
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(args.config, seed, args.threads, core, Path(tmp), args.extra)
                for seed in args.seeds]
    print("| seed | from the command's start to the target (s) | training (s) | step | "
          "val/loss there | final val/loss | whole command (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        reached = "target/command_time_s" in r
        cells = ([f"{r['target/command_time_s']:.1f}", f"{r['target/train_time_s']:.1f}",
                  f"{r['target/step']:.0f}", f"{r['target/val_loss']:.4f}"] if reached
                 else ["not reached", "-", "-", "-"])
        final = f"{r['final_val']:.4f}" if r["final_val"] is not None else "-"
        print(f"| {r['seed']} | " + " | ".join(cells) + f" | {final} | {r['whole_s']:.1f} |")
    reached = [r for r in runs if "target/command_time_s" in r]
    print(f"\nreached by {len(reached)} of {len(runs)} seeds; from the command's start: "
          f"{spread([r['target/command_time_s'] for r in reached])} s; training: "
          f"{spread([r['target/train_time_s'] for r in reached])} s; final val/loss: "
          f"{spread([r['final_val'] for r in runs if r['final_val'] is not None], 4)}")


if __name__ == "__main__":
    main()
