"""Training throughput of a config across attention paths, precisions and torch.compile, and the
overhead of the Lightning training step against a bare PyTorch loop on the same model and batches.

    python scripts/bench_train.py --source input.txt
    python scripts/bench_train.py --source input.txt --variants naive:bf16-mixed --trainer.enable_progress_bar false
    python scripts/bench_train.py --source input.txt --config configs/shakespeare_char.yaml --device cuda \\
        --variants sdpa:bf16-mixed flash:bf16-mixed sdpa:bf16-mixed:compile

A variant is ATTN_IMPL:PRECISION[:compile]. Each is trained --repeats times two ways, alternating,
for --warmup + --steps optimizer steps, and the best run of each way counts: through train.py's
Lightning path (the config's logger, progress bar and callbacks; no validation; one checkpoint
after the timed steps) and through a bare loop that does the same work (same module, optimizer,
LR schedule, clipping, autocast, batches). Tokens/s are counted over the last --steps steps. Flags
this script does not know go to train.py's CLI. Prints a markdown table.
"""

import argparse
import time

import lightning as L
import torch

from train import GPTCLI, GPTLightningModule, LMDataModule

DEFAULT_VARIANTS = ["naive:32-true", "sdpa:32-true", "flash:32-true", "sdpa:bf16-mixed", "flash:bf16-mixed",
                    "flash:bf16-mixed:compile"]


class StepClock(L.Callback):
    """Time at the end of every training batch."""

    def __init__(self):
        self.times = []

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter())


def build(args, attn_impl: str, precision: str, compile: bool) -> GPTCLI:
    """The objects train.py would build for this variant (extra train.py flags last, so they win)."""
    overrides = ["--config", args.config, "--data.source", args.source, "--model.config.attn_impl", attn_impl,
                 "--model.compile", str(compile).lower(), "--trainer.precision", precision,
                 "--trainer.accelerator", args.device, "--trainer.max_steps", str(args.warmup + args.steps),
                 "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null", "--checkpoint.save_last", "false",
                 "--trainer.logger.init_args.save_dir", args.log_dir, *args.train_flags]
    return GPTCLI(GPTLightningModule, LMDataModule, run=False, args=overrides)


def tokens_per_sec(times: list[float], steps: int, tokens_per_step: int) -> float:
    return steps * tokens_per_step / (times[-1] - times[-1 - steps])


def lightning_run(args, variant) -> float:
    cli = build(args, *variant)
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    x, _ = next(iter(cli.datamodule.train_dataloader()))
    return tokens_per_sec(clock.times, args.steps, x.numel())


def bare_run(args, variant) -> float:
    """What the Lightning step does, written out: forward under autocast, backward, clip, step, schedule."""
    cli = build(args, *variant)
    module, dm, trainer = cli.model.to(args.device), cli.datamodule, cli.trainer
    dm.setup("fit")
    module.trainer = trainer  # configure_optimizers reads max_steps and the precision from it
    module.configure_model()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=variant[1] == "bf16-mixed")
    batches = iter(dm.train_dataloader())
    module.train()
    times = []
    for _ in range(args.warmup + args.steps):
        x, y = (t.to(args.device, non_blocking=True) for t in next(batches))
        with autocast:
            _, loss = module.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # as logging the loss does
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return tokens_per_sec(times, args.steps, x.numel())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="training text, as --data.source")
    p.add_argument("--config", default="configs/shakespeare_char_cpu.yaml")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--log-dir", default="runs/bench_train")
    args, args.train_flags = p.parse_known_args(argv)  # the rest goes to train.py's CLI
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for spec in args.variants:
        attn_impl, precision, *rest = spec.split(":")
        variant = (attn_impl, precision, rest == ["compile"])
        lit, bare = [], []
        for _ in range(args.repeats):  # alternate, and keep each one's best: the machine's noise only slows
            lit.append(lightning_run(args, variant))
            bare.append(bare_run(args, variant))
        rows.append((variant, max(lit), max(bare)))

    baseline = next((lit for (impl, prec, comp), lit, _ in rows if (impl, prec, comp) == ("naive", "32-true", False)),
                    None)
    print(f"\n{args.config}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup}, best of {args.repeats}\n")
    print("| attn_impl | precision | compile | Lightning tokens/s | bare loop tokens/s | Lightning overhead "
          "| vs naive fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (impl, prec, comp), lit, bare in rows:
        vs = f"{lit / baseline:.2f}x" if baseline else "n/a"
        print(f"| {impl} | {prec} | {'yes' if comp else 'no'} | {lit:,.0f} | {bare:,.0f} | "
              f"{100 * (bare - lit) / bare:+.1f}% | {vs} |")


if __name__ == "__main__":
    main()
