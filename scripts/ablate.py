"""Train one config with each attention option alone and with all of them, one run after another
on this machine, then print one table: best validation loss and ms/step of each.

    python scripts/ablate_attention.py                      # the CPU config, 2000 steps per run
    python scripts/ablate_attention.py --variants baseline rope --out runs/ablation \
        -- --trainer.max_steps 500 --trainer.precision bf16-mixed

Each variant is train.py's config plus the model options in VARIANTS; what follows ``--`` goes to
every run's train.py command line. Runs land in --out/<project>/<variant>-<id>/ (compare them again
later with scripts/compare_runs.py). The table's ms/step is training time only (no validation): run
nothing else on the machine meanwhile, or the times are not comparable.
"""

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import yaml

from scripts import compare_runs
from scripts._common import UsageError, exit_code

REPO = Path(__file__).resolve().parents[1]

# variant -> the model.config fields it sets; "n_head/2" and "block_size/2" are resolved from
# the shape the runs will have (run_shape)
VARIANTS = {
    "baseline": {},
    "rope": {"pos_emb": "rope"},
    "gqa": {"n_kv_head": "n_head/2"},
    "mqa": {"n_kv_head": 1},
    "window": {"window": "block_size/2"},
    "qk_norm": {"qk_norm": True},
    "all": {"pos_emb": "rope", "n_kv_head": "n_head/2", "window": "block_size/2", "qk_norm": True},
}


def resolve(value, shape: dict):
    """'n_head/2' -> half the config's n_head (at least 1); other values as they are."""
    if isinstance(value, str) and "/" in value:
        field, divisor = value.split("/")
        return max(1, shape[field] // int(divisor))
    return value


def run_shape(config: str, extra: list[str]) -> dict:
    """n_head and block_size of the runs, from the config train.py would run with these flags
    (LightningCLI's --print_config merges them as training does)."""
    printed = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", config,
                              *extra, "--print_config"], capture_output=True, text=True)
    if printed.returncode != 0:
        reason = printed.stderr.strip().splitlines()[-1].removeprefix("error: ")
        raise UsageError(f"train.py refuses --config and the flags after '--' ({reason})")
    merged = yaml.safe_load(printed.stdout)
    return {"n_head": merged["model"]["config"]["n_head"],
            "block_size": merged["data"]["block_size"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char_cpu.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="runs/ablation", help="the runs' save_dir")
    p.add_argument("--plot", default="ablate_attention.png", help="val/loss curves, one per run")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        raise UsageError(f"no config at {args.config}")
    shape = run_shape(args.config, extra)
    folders = []
    for name in args.variants:
        fields = {k: resolve(v, shape) for k, v in VARIANTS[name].items()}
        overrides = [f"--model.config.{k}={str(v).lower() if isinstance(v, bool) else v}"
                     for k, v in fields.items()]
        command = [sys.executable, str(REPO / "train.py"), "fit", "--config", args.config,
                   f"--run.save_dir={args.out}", f"--run.name={name}", "--run.group=ablation",
                   *overrides, *extra]
        print(f"\n== {name}: {' '.join(overrides) or 'the config as it is'}", flush=True)
        before = set(Path(args.out).glob(f"*/{name}-*"))
        subprocess.run(command, check=True)
        folders += sorted(set(Path(args.out).glob(f"*/{name}-*")) - before)
    print()
    compare_runs.main([*map(str, folders), "--plot", args.plot])


if __name__ == "__main__":
    sys.exit(exit_code(main))
