"""Run the bad inputs of a sweep file (experiments/sweeps/bad_input.yaml) and count how each ended:
clean (a non-zero exit status and an `error:` line last, no traceback), untidy (no traceback, but
not one line), traceback, or silent (exit 0);
for the inputs that should run, clean (exit 0, the expected output) or wrong.

    python experiments/sweep_bad_input.py [experiments/sweeps/bad_input.yaml] [--jobs 2]

It trains a tiny GPT first (its checkpoint is {ckpt}), mounts a read-only tmpfs for {ro} where it
runs as root (else a folder without write permission), and prints one line per case, then the
counts; the lab's log records them (experiments/LOG.md)."""

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def setup(tmp: Path) -> dict[str, str]:
    from conftest import make_text  # the tests' small corpus

    (tmp / "corpus.txt").write_text(make_text())
    (tmp / "empty.txt").write_text("")
    (tmp / "broken.yaml").write_text("model:\n  betas: [0.9, 0.95\n")
    (tmp / "empty-run").mkdir()
    (tmp / "empty-run" / "metrics.csv").write_text("")
    (tmp / "half-run").mkdir()
    (tmp / "half-run" / "metrics.csv").write_text("step,val/loss\n0,3.5\n1,3.")
    ro = tmp / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)]).returncode == 0
    if not mounted:
        ro.chmod(0o555)
    return {"text": str(tmp / "corpus.txt"), "tmp": str(tmp), "ro": str(ro),
            "mounted": str(mounted)}


def command(case: list[str], train: list[str], values: dict[str, str]) -> list[str]:
    words = [*train, *case[1:]] if case[0] == "train" else case
    script = "train.py" if case[0] == "train" else words[0]
    words = ["fit", *words] if case[0] == "train" else words[1:]
    return [sys.executable, str(REPO / script), *(w.format(**values) for w in words)]


def outcome(process: subprocess.CompletedProcess, stdout: str | None) -> tuple[str, str]:
    """clean, traceback or silent, and the last line; ``stdout``: what a run that should work
    prints (None: the case should fail)."""
    lines = [line for line in process.stderr.strip().splitlines() if line.strip()]
    if lines and lines[-1].startswith("(set MINIGPT_TRACEBACK=1"):  # (the older error's 2nd line)
        lines.pop()
    last = lines[-1] if lines else ""
    if "Traceback" in process.stderr:
        return "traceback", last
    if stdout is not None:
        ok = process.returncode == 0 and stdout in process.stdout
        return ("clean" if ok else "wrong"), last or process.stdout.strip()[-160:]
    if process.returncode == 0:
        return "silent", last
    # one line that says what was wrong, else "untidy" (a usage dump, a message over lines)
    return ("clean" if last.startswith(("error:", "stopped")) else "untidy"), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", default=str(REPO / "experiments/sweeps/bad_input.yaml"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        values = setup(Path(tmp))
        env = {**os.environ, "WANDB_MODE": "offline", "NETRC": f"{tmp}/no-netrc",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("WANDB_API_KEY", None)
        train = sweep["train"]
        first = command(["train", "--run.mode", "offline"], train,
                        {**values, "tmp": f"{tmp}/first"})
        subprocess.run(first, env=env, capture_output=True, check=True)
        values["ckpt"] = str(next(Path(tmp, "first").glob("runs/*/*/checkpoints/last.ckpt")))

        def run(item):
            name, case = item
            stdout = case["stdout"] if isinstance(case, dict) else None
            case = case["command"] if isinstance(case, dict) else case
            env_case = {**env, "WANDB_MODE": ""} if "online" in case else env
            process = subprocess.run(command(case, train, values), env=env_case,
                                     capture_output=True, text=True, timeout=600)
            return name, outcome(process, stdout)

        counts: dict[str, int] = {}
        with ThreadPoolExecutor(args.jobs) as pool:
            cases = {**sweep["cases"], **sweep.get("runs", {})}
            for name, (kind, last) in pool.map(run, cases.items()):
                counts[kind] = counts.get(kind, 0) + 1
                print(f"{kind:9} {name}: {last[:160]}", flush=True)
        if values["mounted"] == "True":
            subprocess.run(["umount", "-l", values["ro"]])
    print(f"tried {sum(counts.values())}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
