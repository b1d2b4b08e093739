#!/usr/bin/env bash
# The GPU speedrun study: variants of configs/speedrun_char_gpu.yaml, each a whole train.py command
# timed from its start to val/loss <= 1.47, then the fastest variant again with two more seeds
# (three in all), then the test suite on CUDA. For one machine with a CUDA GPU and no internet, run
# from the repository root, with the wheels of the packages the machine lacks in .whl/; results go
# to $OUT (each run's log and metrics.csv, and summary.md).
set -uo pipefail
source experiments/gpu_env.sh  # $WORK, $OUT, the packages, the environment
SUMMARY="$OUT/summary.md"
echo "| run | whole command s | time to 1.47 | best val/loss | flags |" > "$SUMMARY"

# run NAME FLAGS...: one whole command, its log and metrics.csv kept, its line in summary.md
run() {
    local name=$1; shift
    local began ended
    began=$(date +%s.%N)
    timeout 75 python3 train.py fit --config configs/speedrun_char_gpu.yaml \
        --run.save_dir "$WORK/runs" --run.name "$name" --trainer.enable_progress_bar false "$@" \
        > "$OUT/$name.log" 2>&1
    ended=$(date +%s.%N)
    cp "$WORK"/runs/mini-gpt/"$name"-*/metrics.csv "$OUT/$name.csv" 2>/dev/null
    local target best
    target=$(grep -a -E "^Time to val/loss|has not reached" "$OUT/$name.log" | tail -1)
    best=$(python3 -c "import csv, sys
v = [float(r['val/loss']) for r in csv.DictReader(open(sys.argv[1])) if r.get('val/loss')]
print(min(v) if v else '-')" "$OUT/$name.csv" 2>/dev/null)
    local whole
    whole=$(python3 -c "print(f'{$ended - $began:.1f}')")
    echo "| $name | $whole | ${target:-failed} | ${best:--} | $* |" | tee -a "$SUMMARY"
}

# the variants, one after another (seed 1337)
declare -A VARIANTS=(
    [base]=""
    [dropout0.2]="--model.config.dropout 0.2"
    [steps1500]="--trainer.max_steps 1500 --model.lr_decay_steps 1500"
    [steps700_dropout0]="--trainer.max_steps 700 --model.lr_decay_steps 700
                         --model.config.dropout 0.0"
    [steps1500_dropout0.2]="--trainer.max_steps 1500 --model.lr_decay_steps 1500
                            --model.config.dropout 0.2"
    [muon0.03]="--model.muon_lr 0.03 --model.lr 4e-3 --model.min_lr 4e-4"
)
ORDER=(base dropout0.2 steps1500 steps700_dropout0 steps1500_dropout0.2 muon0.03)
for name in "${ORDER[@]}"; do
    # shellcheck disable=SC2086
    run "$name" ${VARIANTS[$name]}
done

# the fastest to 1.47 (from the command's start), or else the lowest loss, with seeds 1338 and 1339
best=$(python3 - "$OUT" "${ORDER[@]}" <<'EOF'
import csv, sys
out, names = sys.argv[1], sys.argv[2:]
def score(name):
    try:
        rows = [r for r in csv.DictReader(open(f"{out}/{name}.csv")) if r.get("val/loss")]
    except OSError:
        rows = []
    if not rows:  # no validation: failed, or stopped before the first
        return (2, 0.0)
    hit = [float(r["val/command_time_s"]) for r in rows if float(r["val/loss"]) <= 1.47]
    return (0, hit[0]) if hit else (1, min(float(r["val/loss"]) for r in rows))
print(min(names, key=score))
EOF
)
echo "fastest: $best" | tee -a "$SUMMARY"
for seed in 1338 1339; do
    # shellcheck disable=SC2086
    run "$best-seed$seed" ${VARIANTS[$best]} --seed_everything "$seed"
done

# the CUDA tests, where time is left (a device session lends minutes)
[ -n "${SKIP_TESTS:-}" ] || [ "$SECONDS" -gt 420 ] \
    || timeout 150 python3 -m pytest -q -x -n 12 -m "not slow" -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | tail -8
