"""Ablations: train a baseline config with each change alone and with all of them, one run after
another on this machine, then print one table (scripts/compare_runs.py's) and plot val/loss against
step and wall time.

    python scripts/ablate.py attention                 # the attention options on the CPU config
    python scripts/ablate.py recipe                    # nanoGPT's CPU recipe -> ours, to val 1.88
    python scripts/ablate.py recipe --variants baseline muon recipe --out runs/ablation \\
        -- --trainer.max_steps 500 --seed_everything 1338
    python scripts/ablate.py translation -- --data.source ../shared/data/multi30k
    python scripts/ablate.py translation_budget -- --data.source ../shared/data/multi30k  # 5 h
    python scripts/ablate.py translation_steps -- --data.source ../shared/data/multi30k
    python scripts/ablate.py translation_2400 -- --data.source ../shared/data/multi30k

A study (STUDIES) is a baseline config, its variants (train.py flags added to it; a variant that
gives --config replaces the baseline config) and the flags every run of it gets. What follows
``--`` goes to every run's train.py command line, after those. Runs land in
--out/<project>/<variant>-<id>/ (compare them again later with scripts/compare_runs.py). Times are
training time (validations left out): run nothing else on the machine meanwhile, or they are not
comparable.
"""

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import yaml

from scripts import compare_runs
from training.errors import UsageError, exit_code

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Study:
    config: str  # the baseline's config, relative to the repository
    variants: dict[str, list[str]]  # name -> train.py flags; "n_head/2", "block_size/2" resolved
    flags: list[str] = field(default_factory=list)  # every run's
    target: float | None = None  # compare_runs --target: steps and seconds to this val/loss


def model(**fields) -> list[str]:
    """--model.config.* flags; booleans as YAML spells them."""
    return [f"--model.config.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in fields.items()]


# the translation model before Muon: AdamW for every parameter
ADAMW_SEQ2SEQ = ["--model.optimizer=adamw"]
# the translation config before its dropout went to 0, its batches to 1,500 tokens, its label
# smoothing to 0.2 and its word dropout to 0.1
DROPOUT_BEFORE, BATCHES_BEFORE = "--model.config.dropout=0.1", "--data.max_tokens=3000"
SMOOTHING_BEFORE = "--model.config.label_smoothing=0.1"
NO_WORD_DROPOUT = "--model.config.word_dropout=0"
SEQ2SEQ_BEFORE = [DROPOUT_BEFORE, BATCHES_BEFORE, SMOOTHING_BEFORE, NO_WORD_DROPOUT]
# the steps a 2-core CPU without bf16 trains in the translation config's budget, as a schedule
AVX2_STEPS = ["--trainer.max_time=null", "--trainer.max_steps=2100"]
# ... and since big freed tensors stay in the heap (~14% less time a step): the steps alone, for
# a study whose variants set their own
AVX2_STEPS_KEPT = ["--trainer.max_steps=2400"]
# the translation config's AdamW lr (the embedding's) before it doubled to 3e-3; min_lr with it,
# since every group's lr decays to its peak * min_lr / lr (Muon's too)
LR_BEFORE = ["--model.lr=1.5e-3", "--model.min_lr=1e-4"]
# the translation config's weight decay before it went from 0.1 to 0.2 (translation_2400): every
# earlier translation study ran with 0.1, so "the config" in their comments is the config with it
WEIGHT_DECAY_BEFORE = "--model.weight_decay=0.1"

STUDIES = {
    # docs/attention.md section 9.5: the attention options of today's models, alone and together
    "attention": Study("configs/shakespeare_char_cpu.yaml", {
        "baseline": [],
        "rope": model(pos_emb="rope"),
        "gqa": model(n_kv_head="n_head/2"),
        "mqa": model(n_kv_head=1),
        "window": model(window="block_size/2"),
        "qk_norm": model(qk_norm=True),
        "all": model(pos_emb="rope", n_kv_head="n_head/2", window="block_size/2", qk_norm=True),
    }),
    # docs/recipe.md: from nanoGPT's CPU recipe to configs/shakespeare_char_cpu.yaml, each change
    # alone; validating every 100 steps finds the step that reaches 1.88 to within 100
    "recipe": Study("configs/shakespeare_char_cpu_nanogpt.yaml", {
        "baseline": [],
        "lr3e-3": ["--model.lr=3e-3", "--model.min_lr=3e-4"],
        "no_embedding_decay": ["--model.decay_embeddings=false"],
        "rope": model(pos_emb="rope"),
        "qk_norm": model(qk_norm=True),
        "relu2": model(mlp="relu2"),
        "rmsnorm": model(norm="rmsnorm"),
        "untied": model(tie_embeddings=False),
        "zero_init": model(zero_init_proj=True),
        "softcap": model(logit_softcap=15),
        "muon": ["--model.optimizer=muon"],
        "recipe": ["--config=configs/shakespeare_char_cpu.yaml"],
    }, flags=["--trainer.val_check_interval=100", "--target_loss=1.88"], target=1.88),
    # docs/translation.md: from the AdamW translation model to Muon, and the attention and MLP
    # options alone and on top of Muon, in 500-step runs (greedy val BLEU at the end, then beam 4 at
    # length penalty 1), with the dropout and batches the config had then
    "translation": Study("configs/multi30k_de_en.yaml", {
        "baseline": ADAMW_SEQ2SEQ,
        "muon": [],
        "rope_qk_norm": [*ADAMW_SEQ2SEQ, *model(pos_emb="rope", qk_norm=True)],
        "muon_rope_qk_norm_relu2": model(pos_emb="rope", qk_norm=True, mlp="relu2"),
    }, flags=[*SEQ2SEQ_BEFORE, *LR_BEFORE, WEIGHT_DECAY_BEFORE, "--trainer.max_steps=500",
              "--trainer.max_time=null", "--model.warmup_steps=100",
              "--trainer.val_check_interval=500", "--model.tune_length_penalty=null"]),
    # docs/translation.md: the whole budget of configs/multi30k_de_en.yaml (dev-tuned length
    # penalty, beam 4 on val at the end) on a 2-core CPU without bf16, from the config before
    # dropout 0, 1,500-token batches and label smoothing 0.2 to label smoothing 0.2, one change at
    # a time, then the changes tried on top of it (word dropout 0.1 is the config's now). Its runs
    # had 26.5 minutes of training, the budget then (the final beam search took 3x longer before
    # KVCache.reorder moved only the filled positions), and the steps cap then, 2,400, which that
    # CPU never reached
    "translation_budget": Study("configs/multi30k_de_en.yaml", {
        "before": SEQ2SEQ_BEFORE,
        "vocab_4000": [*SEQ2SEQ_BEFORE, "--data.vocab_size=4000"],
        "tokens_1500": [DROPOUT_BEFORE, SMOOTHING_BEFORE, NO_WORD_DROPOUT],
        "dropout_0": [BATCHES_BEFORE, SMOOTHING_BEFORE, NO_WORD_DROPOUT],
        "dropout_0_tokens_1500": [SMOOTHING_BEFORE, NO_WORD_DROPOUT],
        "dropout_0.05": ["--model.config.dropout=0.05", SMOOTHING_BEFORE, NO_WORD_DROPOUT],
        "label_smoothing_0.2": [NO_WORD_DROPOUT],
        "label_smoothing_0.3": ["--model.config.label_smoothing=0.3", NO_WORD_DROPOUT],
        "word_dropout_0.1": [],
        "word_dropout_0.2": ["--model.config.word_dropout=0.2"],
    }, flags=["--trainer.max_time=00:00:26:30", "--trainer.max_steps=2400", *LR_BEFORE,
              WEIGHT_DECAY_BEFORE]),
    # docs/translation.md: the config before its lr doubled, where the machine trains to its steps
    # cap within the budget (measured on a 2-core CPU with bf16): the cap and word dropout together;
    # then word dropout without a clock at the ~2,100 steps a CPU without bf16 trains in the budget,
    # standing in for such a CPU (the clock ends the first three at about that step there); run
    # those two with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for its numerics too
    # (docs/speed.md). Last, the config as it is, with the schedule of the cap: the cosine over its
    # 4,000 steps, not the clock (the same on a machine that the cap stops first)
    "translation_steps": Study("configs/multi30k_de_en.yaml", {
        "steps_2400": [*LR_BEFORE, NO_WORD_DROPOUT, "--trainer.max_steps=2400"],
        "word_dropout_0.1_steps_6000": [*LR_BEFORE, "--trainer.max_steps=6000"],
        "word_dropout_0.1_steps_4000": LR_BEFORE,
        "steps_2100": [*LR_BEFORE, *AVX2_STEPS, NO_WORD_DROPOUT],
        "word_dropout_0.1_steps_2100": [*LR_BEFORE, *AVX2_STEPS],
        "config_steps_4000": ["--trainer.max_time=null"],
    }, flags=[WEIGHT_DECAY_BEFORE]),
    # docs/translation.md: the learning rates where the clock ends training near step 2,100 (a
    # 2-core CPU without bf16), one change at a time from the config before its lr doubled, at
    # those steps (translation_steps' word_dropout_0.1_steps_2100); lr_3e-3 is the config as it
    # is. Run with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for such a CPU's numerics
    # (docs/speed.md)
    "translation_2100": Study("configs/multi30k_de_en.yaml", {
        "lr_1.5e-3": LR_BEFORE,
        "muon_lr_0.01": [*LR_BEFORE, "--model.muon_lr=0.01"],
        "muon_lr_0.04": [*LR_BEFORE, "--model.muon_lr=0.04"],
        "lr_3e-3": [],
        "lr_6e-3": ["--model.lr=6e-3", "--model.min_lr=4e-4"],
    }, flags=[*AVX2_STEPS, WEIGHT_DECAY_BEFORE]),
    # docs/translation.md: the levers left after the learning rates, one at a time from the config
    # as it is (translation_2100's lr_3e-3, its baseline), at the same ~2,100 steps; run them with
    # the same environment variables for the numerics of a CPU without bf16
    "translation_levers": Study("configs/multi30k_de_en.yaml", {
        "config": [],
        "warmup_100": ["--model.warmup_steps=100"],
        "warmup_300": ["--model.warmup_steps=300"],
        "min_lr_0": ["--model.min_lr=0"],
        "encoder_4_decoder_2": model(n_encoder_layer=4, n_decoder_layer=2),
    }, flags=[*AVX2_STEPS, WEIGHT_DECAY_BEFORE]),
    # docs/translation.md: once train.py kept big freed tensors for reuse (scripts/_common.py), a
    # step of a CPU without bf16 took ~14% less time, so its budget holds ~2,400 steps (estimated
    # from the step times, not run with the clock); at those steps, the config then (weight decay
    # 0.1), Muon with 3 Newton-Schulz iterations instead of 5 at the ~2,700 steps that buys, and
    # changes that cost no time: weight decay 0.2 won, the config as it is now; last, 8 heads on
    # top of it. Run with the same environment variables
    "translation_2400": Study("configs/multi30k_de_en.yaml", {
        "weight_decay_0.1": [WEIGHT_DECAY_BEFORE, *AVX2_STEPS_KEPT],
        "muon_ns_steps_3": [WEIGHT_DECAY_BEFORE, "--model.muon_ns_steps=3",
                            "--trainer.max_steps=2700"],
        "weight_decay_0": ["--model.weight_decay=0", *AVX2_STEPS_KEPT],
        "weight_decay_0.2": AVX2_STEPS_KEPT,  # the config as it is
        "n_head_8": [WEIGHT_DECAY_BEFORE, *model(n_head=8), *AVX2_STEPS_KEPT],
        "n_head_8_weight_decay_0.2": [*model(n_head=8), *AVX2_STEPS_KEPT],
        "weight_decay_0.3": ["--model.weight_decay=0.3", *AVX2_STEPS_KEPT],
    }, flags=["--trainer.max_time=null"]),
    # docs/translation.md: the config at fewer steps than the ~2,400 of the AVX2 CPU's budget:
    # what a slower CPU without bf16 scores (a stand-in slower than that CPU trained ~1,850 with
    # its clock). Run with the same environment variables as translation_2400.
    "translation_fewer_steps": Study("configs/multi30k_de_en.yaml", {
        "steps_1850": ["--trainer.max_steps=1850"],
        "steps_2100": ["--trainer.max_steps=2100"],
    }, flags=["--trainer.max_time=null"]),
}


def resolve(flag: str, shape: dict) -> str:
    """'--x=n_head/2' -> '--x=2' for n_head 4 (at least 1); '--config=configs/...' -> the
    repository's file, from any working directory; other flags as they are."""
    name, _, value = flag.partition("=")
    if name == "--config":
        return f"--config={REPO / value}"
    field_name, slash, divisor = value.partition("/")
    if slash and field_name in shape:
        return f"{name}={max(1, shape[field_name] // int(divisor))}"
    return flag


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
            "block_size": merged["data"].get("block_size")}  # a GPT's (the seq2seq has max_len)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=list(STUDIES), help="the baseline and its variants")
    p.add_argument("--config", default=None, help="another baseline config than the study's")
    p.add_argument("--variants", nargs="+", default=None,
                   help="the variants to run, in order (default: all of the study's)")
    p.add_argument("--out", default="runs/ablation", help="the runs' save_dir")
    p.add_argument("--plot", default=None, help="val/loss curves (default: ablate_<study>.png)")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    unknown = set(args.variants or ()) - set(study.variants)
    if unknown:
        raise UsageError(f"{', '.join(sorted(unknown))}: not a variant of the {args.study} study; "
                         f"choose from {', '.join(study.variants)}")
    config = args.config or str(REPO / study.config)
    if not Path(config).is_file():
        raise UsageError(f"no config at {config}")
    shape = run_shape(config, extra)
    folders = []
    for name in args.variants or study.variants:
        flags = [resolve(flag, shape) for flag in study.variants[name]]
        own_config = [flag for flag in flags if flag.startswith("--config=")]
        base = [] if own_config else ["--config", config]
        command = [sys.executable, str(REPO / "train.py"), "fit", *base, *flags,
                   f"--run.save_dir={args.out}", f"--run.name={name}",
                   f"--run.group=ablate-{args.study}", *study.flags, *extra]
        print(f"\n== {name}: {' '.join(flags) or 'the baseline config as it is'}", flush=True)
        before = set(Path(args.out).glob(f"*/{name}-*"))
        subprocess.run(command, check=True)
        folders += sorted(set(Path(args.out).glob(f"*/{name}-*")) - before)
    print()
    target = ["--target", str(study.target)] if study.target is not None else []
    compare_runs.main([*map(str, folders), "--plot", args.plot or f"ablate_{args.study}.png",
                       *target])


if __name__ == "__main__":
    sys.exit(exit_code(main))
