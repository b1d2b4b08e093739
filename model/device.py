"""What the device can do, and the precision and attention path that follow from it.

``precision: auto`` and ``attn_impl: auto`` (the configs' defaults) resolve here at start-up. The
rule is two small pure functions of a ``DeviceInfo``, so every branch is tested on any machine;
only ``device_info`` asks the hardware.

Why a rule and not one default: bf16 autocast is 1.4x faster than fp32 on a CPU with AVX-512 BF16
(or AMX) instructions, and ~13x *slower* on one without them (AVX2 only), where PyTorch emulates it
(docs/speed.md has the measurements). GPUs before Ampere (V100, T4) have no bf16 either, and take
fp16 with a loss scaler instead.

``peak_flops`` gives the dense peak that MFU is measured against, from a table of common GPUs.
"""

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEVICE_TYPES = ("cuda", "mps", "cpu")
# The written-out attention beat PyTorch's fused CPU kernels under bf16 at T=64 (their backward is
# slow in bf16 there); its T x T matrices cost more as T grows, so past this context the fused
# path is used.
NAIVE_BF16_CPU_MAX_T = 128

# Dense bf16 (= fp16) tensor-core peak of one GPU in TFLOP/s, by a lower-case fragment of the name
# torch.cuda.get_device_name() gives. Source: NVIDIA's datasheets and architecture whitepapers,
# whose tensor figures from Ampere on are "with sparsity" (marked *): dense is half of those (the
# V100's and T4's are dense already). MFU is against the dense peak: training runs no 2:4-sparse
# matmuls. (Lightning's table has the sparse figures for the H200 and H100 NVL, the non-tensor
# FP32 rate as the RTX 4090's bf16, and no entry for "NVIDIA H200", the name of an H200 SXM.) The
# GeForce figures are with FP32 accumulate, what PyTorch's matmuls use; those GPUs run
# FP16-accumulate matmuls twice as fast.
DENSE_PEAK_TFLOPS = {
    "h100 80gb hbm3": 989.4, "h100 sxm": 989.4, "h100 pcie": 756.0, "h100 nvl": 835.5,
    "h200": 989.4, "h200 nvl": 835.5, "gh200": 989.4,  # "NVIDIA H200" is the SXM part
    "b200": 2250.0,
    "a100": 312.0, "a10": 125.0,  # the A100's SXM and PCIe parts have the same peak
    "l4": 121.0, "l40s": 362.05, "l40": 181.0,
    "rtx 4090": 165.2, "rtx 3090": 71.0,
    "v100": 125.0, "t4": 65.0,  # fp16 only (see FP16_ONLY)
}
# GPUs before Ampere: fp16 tensor cores, but no bf16 and no TF32
FP16_ONLY = frozenset({"v100", "t4"})


@dataclass(frozen=True)
class DeviceInfo:
    """The facts the rule needs about one device.

    type: "cuda", "mps" or "cpu".
    name: what the hardware calls itself, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (AVX2)".
    bf16: native bf16 arithmetic (CUDA: Ampere or newer; CPU: AVX-512 BF16 or AMX; MPS: macOS 14+).
    flash_attn: the ``flash_attn`` package is installed and can run here (CUDA only).
    """

    type: str
    name: str
    bf16: bool
    flash_attn: bool = False

    def describe(self) -> str:
        return f"{self.type} ({self.name}, {'native bf16' if self.bf16 else 'no native bf16'})"


def choose_precision(info: DeviceInfo) -> str:
    """The Lightning precision for ``auto``: mixed bf16 where the device computes in bf16; otherwise
    fp16 with a loss scaler on GPUs (fast there even without bf16) and plain fp32 on CPUs."""
    if info.bf16:
        return "bf16-mixed"
    return "32-true" if info.type == "cpu" else "16-mixed"


def choose_attn_impl(info: DeviceInfo, precision: str, *, seq_len: int,
                     key_mask: bool = False) -> str:
    """The attention path for ``auto``, given the precision the run uses.

    seq_len: the longest sequence attended over (a GPT's block_size, a seq2seq model's max_len).
    key_mask: the model masks padded keys (the seq2seq model): flash kernels take no such mask.
    (The ``flash`` path is chosen on CUDA only: on a CPU it has no attention dropout.)
    """
    low_precision = precision.startswith(("bf16", "16"))
    if info.type == "cuda" and info.flash_attn and low_precision and not key_mask:
        return "flash"  # Dao-AILab's kernels: SDPA may not pick a flash kernel for every shape
    if info.type == "cpu" and precision.startswith("bf16") and seq_len <= NAIVE_BF16_CPU_MAX_T:
        return "naive"  # its plain bf16 GEMMs beat the CPU flash kernel's bf16 backward at short T
    return "sdpa"  # PyTorch's fused kernels: flash (CPU, GPU), memory-efficient or cuDNN (GPU)


def slow_precision_warning(info: DeviceInfo, precision: str) -> str | None:
    """A one-line warning for an explicit precision that is known to be slow on this device."""
    if info.type == "cpu" and not info.bf16 and str(precision).startswith(("bf16", "16")):
        kind = "bf16" if str(precision).startswith("bf16") else "fp16"
        return (f"precision {precision} on this CPU ({info.name}) is emulated: it has no native "
                f"{kind} instructions (bf16-mixed ran ~13x slower than 32-true on an AVX2 CPU). "
                "Use --trainer.precision auto (32-true here) unless you are testing precision "
                "itself")
    if info.type == "cuda" and not info.bf16 and str(precision).startswith("bf16"):
        return (f"{info.name} has no native bf16: {precision} is slow or unsupported there; use "
                f"--trainer.precision auto (16-mixed here)")
    return None


def unsupported_precision(info: DeviceInfo, precision: str) -> str | None:
    """Why ``precision`` cannot run as asked on this device, where Lightning would run another one
    without saying so; None where it can."""
    if info.type == "cpu" and str(precision) in ("16-mixed", "16"):
        return (f"--trainer.precision {precision}: a CPU has no fp16 autocast (Lightning would "
                f"train in bf16-mixed instead); use --trainer.precision auto (what this CPU runs "
                f"fastest) or name the precision to run, e.g. 32-true or bf16-mixed")
    return None


def peak_dtype(precision: str, tf32: bool = True) -> str | None:
    """The tensor-core number format a Lightning precision multiplies matrices in: "bf16", "fp16",
    "tf32" (fp32 weights, where ``tf32``: PyTorch uses TF32 matmuls on GPUs that have them when
    ``torch.get_float32_matmul_precision() != "highest"``), or None (plain fp32, fp64, others)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if precision.startswith("32") and tf32:
        return "tf32"
    return None


def gpu_table_key(device_name: str) -> str | None:
    """The entry of ``DENSE_PEAK_TFLOPS`` for a device name, or None.

    A fragment counts where it stands as whole words of the name: "a10" is not the "a10" of
    "NVIDIA A100" or "NVIDIA A10G" (a different GPU, with no entry: its peak is not published),
    nor "l4" that of "NVIDIA L40S". Of the fragments that count, the longest wins: the most
    specific one, "h200 nvl" over "h200" in "NVIDIA H200 NVL"."""
    name = device_name.lower()
    found = [key for key in DENSE_PEAK_TFLOPS
             if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", name)]
    return max(found, key=len, default=None)


def peak_flops(device_name: str, precision: str, tf32: bool = True) -> float | None:
    """Dense peak FLOP/s of one device at a Lightning precision ("bf16-mixed", "16-true",
    "32-true" ...), from ``DENSE_PEAK_TFLOPS``; None where it has no figure: an unknown device
    (any CPU: their peaks vary with cores, clock and vector width), bf16 or TF32 on a GPU without
    them, plain fp32 (``tf32`` False) or fp64.

    tf32: fp32 matmuls run in TF32 (``torch.get_float32_matmul_precision() != "highest"``,
    train.py's "high"); the TF32 peak is half the bf16 one on every GPU of the table.
    """
    key, dtype = gpu_table_key(device_name), peak_dtype(precision, tf32)
    if key is None or dtype is None or (key in FP16_ONLY and dtype != "fp16"):
        return None
    tflops = DENSE_PEAK_TFLOPS[key] / 2 if dtype == "tf32" else DENSE_PEAK_TFLOPS[key]
    return tflops * 1e12


def resolve_device(accelerator: str | None = "auto") -> str:
    """A Lightning accelerator name ("auto", "gpu", "cuda", "mps", "cpu") as a device type, picking
    cuda, then mps, then cpu for "auto"."""
    accelerator = (accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator in DEVICE_TYPES:
        return accelerator
    if accelerator != "auto":
        raise ValueError(f"unknown accelerator {accelerator!r}; choose auto, cpu, cuda (gpu) "
                         f"or mps")
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_info(device_type: str) -> DeviceInfo:
    """Ask the hardware (the first device of ``device_type``)."""
    if device_type == "cuda":
        from .attention import flash_attn_func  # None when the flash_attn package is missing

        return DeviceInfo("cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(),
                          flash_attn=flash_attn_func is not None)
    if device_type == "mps":
        return DeviceInfo("mps", "Apple GPU", torch.backends.mps.is_macos_or_newer(14, 0))
    if device_type != "cpu":
        raise ValueError(f"unknown device type {device_type!r}; choose one of "
                         f"{', '.join(DEVICE_TYPES)}")
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", ...
    return DeviceInfo("cpu", f"{cpu_name()} ({capability})", cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU: AVX-512 BF16 or AMX. PyTorch reports them through private functions;
    should those disappear, the answer is the safe one (no bf16: fp32 is never the slow choice)."""
    # ATEN_CPU_CAPABILITY=avx2 (or default) holds PyTorch's kernels to AVX2 on any x86 CPU, and
    # its bf16 arithmetic is emulated then, as on a CPU without bf16 (docs/speed.md)
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # noqa: BLE001 (a private API that changed: take the safe answer)
        return False


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B13" or "Apple M2"."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"

