"""`make install`'s PyTorch step: a right-sized build. Where no NVIDIA GPU is found on Linux, torch
comes from PyTorch's CPU wheel index if that index answers within a few seconds (a bare `pip install
torch` there pulls several GB of CUDA libraries), else from pip's configured package index; either
way one line says which. Standard library only: it runs before anything else is installed.

    python scripts/_install_torch.py [--index auto|URL|""] [--dry-run] "torch==2.13.0"

--index auto (the default) decides as above, a URL uses that index, "" pip's configured one."""

import argparse
import shlex
import subprocess
import sys
import threading
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu() -> bool:
    """Whether `nvidia-smi -L` (on PATH wherever an NVIDIA driver is installed) lists a GPU."""
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the index at ``url`` answers for torch within ``timeout`` s, name lookup included
    (which urlopen's own timeout leaves out: hence the thread)."""
    answered = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/torch/", method="HEAD"),
                                        timeout=timeout):
                answered.append(True)
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def choose(index: str, torch: list[str]) -> tuple[list[str], str]:
    """pip's index arguments for ``torch`` (the requirement's words) and the line saying which."""
    if any(word.startswith("-") for word in torch):
        return [], f"PyTorch: pip install {shlex.join(torch)} (TORCH names its own options)"
    if index != "auto":
        if index:
            return ["--index-url", index], f"PyTorch: from {index} (TORCH_INDEX)"
        return [], "PyTorch: from the package index (TORCH_INDEX is empty)"
    if sys.platform != "linux":  # macOS's and Windows' wheels on PyPI carry no CUDA
        return [], f"PyTorch: default build from the package index ({sys.platform})"
    if has_nvidia_gpu():
        return [], "PyTorch: default build (NVIDIA GPU found)"
    if reachable(CPU_INDEX):
        return ["--index-url", CPU_INDEX], f"PyTorch: CPU build from {CPU_INDEX} (no NVIDIA GPU)"
    host = CPU_INDEX.split("://", 1)[-1]
    return [], f"PyTorch: the package index's build (no NVIDIA GPU, but {host} not reachable)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("torch", help='the torch requirement, e.g. "torch==2.13.0" (TORCH)')
    parser.add_argument("--index", default="auto", help='auto, an index URL, or "" (TORCH_INDEX)')
    parser.add_argument("--dry-run", action="store_true", help="print pip's command, run nothing")
    args = parser.parse_args(argv)
    torch = shlex.split(args.torch)
    index_args, line = choose(args.index, torch)
    print(line, flush=True)
    command = [sys.executable, "-m", "pip", "install", *index_args, *torch]
    if args.dry_run:
        print(shlex.join(command))
        return 0
    code = subprocess.run(command).returncode
    if code and index_args and args.index == "auto":  # (a pin the CPU index does not have)
        print(f"PyTorch: pip found no {shlex.join(torch)} at {index_args[1]}; trying the package "
              f"index", flush=True)
        code = subprocess.run([sys.executable, "-m", "pip", "install", *torch]).returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
