"""``auto`` precision and attention path: the rule for each kind of device (on any machine), and the
configs resolving through train.py's CLI to the choice for the machine the tests run on."""

import pytest
import torch
from conftest import REPO

import train
import training.cli
from model import GPT, GPTConfig
from model.device import (
    NAIVE_BF16_CPU_MAX_T,
    DeviceInfo,
    choose_attn_impl,
    choose_precision,
    cpu_has_bf16,
    device_info,
    resolve_device,
    slow_precision_warning,
)

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", bf16=True)
H100_FLASH_ATTN = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", bf16=True, flash_attn=True)
T4 = DeviceInfo("cuda", "Tesla T4", bf16=False)
CPU_BF16 = DeviceInfo("cpu", "Intel Xeon (AVX512)", bf16=True)
CPU_AVX2 = DeviceInfo("cpu", "AMD EPYC (AVX2)", bf16=False)
MPS_14 = DeviceInfo("mps", "Apple GPU", bf16=True)
MPS_13 = DeviceInfo("mps", "Apple GPU", bf16=False)


@pytest.mark.parametrize(("info", "precision"), [
    (H100, "bf16-mixed"), (T4, "16-mixed"),  # GPUs: bf16 where the GPU has it, else fp16 with a scaler
    (CPU_BF16, "bf16-mixed"), (CPU_AVX2, "32-true"),  # CPUs: bf16 only where native, else fp32
    (MPS_14, "bf16-mixed"), (MPS_13, "16-mixed"),
])
def test_precision_follows_native_bf16(info, precision):
    assert choose_precision(info) == precision


@pytest.mark.parametrize(("info", "precision", "kwargs", "attn_impl"), [
    (H100_FLASH_ATTN, "bf16-mixed", {}, "flash"),  # the flash_attn package where it is installed
    (H100_FLASH_ATTN, "bf16-mixed", {"key_mask": True}, "sdpa"),  # ... but it takes no padding mask
    (H100_FLASH_ATTN, "32-true", {}, "sdpa"),  # ... nor fp32
    (H100, "bf16-mixed", {}, "sdpa"),  # SDPA picks PyTorch's own flash kernel
    (T4, "16-mixed", {}, "sdpa"),
    (CPU_AVX2, "32-true", {}, "sdpa"),  # CPU fp32: the fused flash kernel
    (CPU_BF16, "bf16-mixed", {}, "naive"),  # CPU bf16 at short context: the written-out path
    (CPU_BF16, "bf16-mixed", {"seq_len": NAIVE_BF16_CPU_MAX_T + 1}, "sdpa"),  # ... not at long ones
    (CPU_BF16, "bf16-mixed", {"key_mask": True}, "naive"),  # the seq2seq model too
    (CPU_BF16, "32-true", {}, "sdpa"),  # an explicit fp32 on a bf16 CPU
    (MPS_14, "bf16-mixed", {}, "sdpa"),
])
def test_attention_path_for_device_and_precision(info, precision, kwargs, attn_impl):
    kwargs = {"seq_len": 64, **kwargs}
    assert choose_attn_impl(info, precision, **kwargs) == attn_impl


def test_every_choice_builds_and_runs_a_model():
    """Whatever the rule picks is a path the model has and can run on a CPU."""
    for info in (CPU_BF16, CPU_AVX2):
        precision = choose_precision(info)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                              attn_impl=choose_attn_impl(info, precision, seq_len=8)))
        assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, 11)


def test_auto_is_refused_outside_train_py_with_a_hint():
    with pytest.raises(ValueError, match="resolved for the device when training starts; in code, choose one of"):
        GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, attn_impl="auto"))


@pytest.mark.parametrize(("info", "precision", "warns"), [
    (CPU_AVX2, "bf16-mixed", True), (CPU_AVX2, "16-mixed", True), (CPU_AVX2, "32-true", False),
    (CPU_BF16, "bf16-mixed", False), (T4, "bf16-mixed", True), (T4, "16-mixed", False), (H100, "bf16-mixed", False),
])
def test_slow_explicit_precision_gets_a_one_line_warning(info, precision, warns):
    message = slow_precision_warning(info, precision)
    assert (message is not None) == warns
    if warns:
        assert "\n" not in message and "auto" in message


def test_resolve_device():
    assert resolve_device("gpu") == resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown accelerator 'tpu'"):
        resolve_device("tpu")


def test_this_cpu_is_described():
    info = device_info("cpu")
    assert info.bf16 == cpu_has_bf16() and info.name and "(" in info.name  # model name (capability)


@pytest.mark.parametrize("capability, bf16", [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_kernels_held_to_avx2_count_as_a_cpu_without_bf16(capability, bf16, monkeypatch):
    """A bf16 CPU whose PyTorch runs AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) emulates bf16: fp32."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_bf16() is bf16


def parse(*args: str):
    """train.py's CLI for these arguments, parsed and resolved but not run."""
    return train.main(list(args), run=False)


@pytest.mark.parametrize("config", ["shakespeare_char_cpu", "shakespeare_char", "shakespeare_gpt2",
                                    "multi30k_de_en"])
def test_every_config_defaults_to_auto(config):
    text = (REPO / "configs" / f"{config}.yaml").read_text()
    assert "precision: auto" in text and "attn_impl: auto" in text


def test_the_cpu_config_resolves_to_this_machines_fast_choice(text_file, cache_dir, capsys):
    cli = parse("--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"), "--data.source", str(text_file),
                "--data.cache_dir", str(cache_dir))
    expected = ("bf16-mixed", "naive") if cpu_has_bf16() else ("32-true", "sdpa")
    assert (cli.config.trainer.precision, cli.config.model.config.attn_impl) == expected
    assert (str(cli.trainer.precision), cli.model.model.config.attn_impl) == expected
    assert cli.model.model.blocks[0].attn.attn_impl == expected[1]


def test_an_explicit_choice_is_kept_and_a_slow_one_warned_about(text_file, cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(training.cli, "accelerator_device", lambda accelerator: CPU_AVX2)
    cli = parse("--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"), "--data.source", str(text_file),
                "--data.cache_dir", str(cache_dir), "--trainer.precision", "bf16-mixed",
                "--model.config.attn_impl", "flash")
    assert (cli.config.trainer.precision, cli.config.model.config.attn_impl) == ("bf16-mixed", "flash")
    assert "is emulated" in caplog.text
