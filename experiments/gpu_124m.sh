#!/usr/bin/env bash
# The GPU checks of the GPT-2 124M config, on one machine with a CUDA GPU and no internet, run from
# the repository root with the wheels of the packages the machine lacks in .whl/ and the results
# written to $OUT: preparing a web-like Parquet corpus on every core, bench_train.py's step time
# with and without compile (tokens/s, MFU, memory), a 200-step training run, and the test suite.
set -uo pipefail
source experiments/gpu_env.sh  # $WORK, $OUT, the packages, the environment
WEB="$WORK/prep/corpus-100mb"
timeout 60 python3 experiments/prep_memory.py --sizes-mb 100 --docs-per-file 2000 \
    --work "$WORK/prep" 2>&1 | tee "$OUT/prep.md"
DATA=(--data.source "$WEB" --data.subset null --data.cache_dir "$WORK/tokens")
timeout 200 python3 scripts/bench_train.py --config configs/gpt2_124m.yaml --device cuda \
    --variants auto:auto auto:auto:compile --steps 6 --warmup 3 --repeats 1 "${DATA[@]}" \
    2>&1 | tee "$OUT/bench.log" | grep -v Warning
timeout 150 python3 train.py fit --config configs/gpt2_124m.yaml "${DATA[@]}" \
    --tokens_per_step 131072 --max_tokens $((200 * 131072)) --trainer.val_check_interval 100 \
    --trainer.limit_val_batches 20 --run.save_dir "$WORK/runs" --run.name gpu-200 2>&1 \
    | tee "$OUT/train.log" | grep -v -E "Warning|it/s]" | tail -25
cp "$WORK"/runs/mini-gpt/gpu-200-*/metrics.csv "$OUT/train_metrics.csv"
[ -n "${SKIP_TESTS:-}" ] || timeout 110 python3 -m pytest -q -x -n 12 -m "not slow" -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | tail -15
