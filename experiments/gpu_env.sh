# What the GPU studies (gpu_*.sh) share, sourced from the repository root: a work folder ($WORK) and
# an output folder ($OUT), the packages the GPU machine lacks installed from the wheels in .whl/
# (no internet there), offline caches and wandb, and the machine's description.
WORK=${WORK:-$(mktemp -d)}  # packages, downloads, caches and runs
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
rm -rf "$WORK/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl || exit 1
export PYTHONPATH="$WORK/site" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true \
    HF_HUB_OFFLINE=1 MINIGPT_CACHE="$WORK/minigpt" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
nvidia-smi -L; nproc
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
