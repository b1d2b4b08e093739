"""MFU against the dense peak of the device in use: the table of GPUs and its look-up (on any
machine), the Throughput callback's choice of peak (a GPU's name faked on a CPU), the logged MFU of
a tiny run, and bench_train's MFU column."""

import csv
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import fit, run_folders, tiny_run
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import RunningStage

import training.callbacks
from model.device import DENSE_PEAK_TFLOPS, peak_flops
from scripts import bench_train
from training.callbacks import Throughput
from training.errors import UsageError

torch.set_num_threads(1)


@pytest.mark.parametrize(("name", "precision", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4),  # H100 SXM
    ("NVIDIA H100 PCIe", "bf16-mixed", 756.0),
    ("NVIDIA H100 NVL", "bf16-mixed", 835.5),  # not the H100's, nor the sparse 1671
    ("NVIDIA H200", "bf16-mixed", 989.4),  # the H200 SXM's name, which Lightning does not know
    ("NVIDIA H200 NVL", "bf16-true", 835.5),
    ("NVIDIA GH200 480GB", "bf16-mixed", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312.0),
    ("NVIDIA A100 80GB PCIe", "16-mixed", 312.0),
    ("NVIDIA A10", "bf16-mixed", 125.0),
    ("NVIDIA L40S", "bf16-mixed", 362.05),
    ("NVIDIA L40", "bf16-mixed", 181.0),  # distinct from the L40S
    ("NVIDIA L4", "bf16-mixed", 121.0),
    ("NVIDIA GeForce RTX 4090", "bf16-mixed", 165.2),  # the tensor rate, not FP32's 82.6
    ("NVIDIA H100 80GB HBM3", "32-true", 989.4 / 2),  # TF32: half the bf16 peak
    ("NVIDIA A100-SXM4-80GB", "32", 156.0),
    ("Tesla V100-SXM2-16GB", "16-mixed", 125.0),
    ("Tesla T4", "16-true", 65.0),
])
def test_dense_peak_of_each_gpu_at_each_precision(name, precision, tflops):
    assert peak_flops(name, precision) == pytest.approx(tflops * 1e12, rel=1e-9)


@pytest.mark.parametrize(("name", "precision", "kwargs"), [
    ("NVIDIA H100 80GB HBM3", "32-true", {"tf32": False}),  # plain fp32: no tensor-core peak
    ("NVIDIA H100 80GB HBM3", "64-true", {}),
    ("Tesla V100-SXM2-16GB", "bf16-mixed", {}),  # no bf16 before Ampere
    ("Tesla V100-SXM2-16GB", "32-true", {}),  # nor TF32
    ("Tesla T4", "bf16-mixed", {}),
    ("NVIDIA A10G", "bf16-mixed", {}),  # not the A10 (no published peak: no entry)
    ("AMD EPYC 7B13 (AVX2)", "32-true", {}),  # a CPU
    ("Intel(R) Xeon(R) Platinum 8481C (AVX512)", "bf16-mixed", {}),
    ("Apple GPU", "bf16-mixed", {}),
])
def test_no_peak_where_the_table_has_no_figure(name, precision, kwargs):
    assert peak_flops(name, precision, **kwargs) is None


def test_the_most_specific_fragment_of_a_name_wins_whatever_the_tables_order():
    """Each name that holds two of the table's fragments gets the longer one's figure."""
    pairs = [("NVIDIA H100 NVL", "h100 nvl"), ("NVIDIA H200 NVL", "h200 nvl"),
             ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA L40S", "l40s"),
             ("NVIDIA A100-SXM4-40GB", "a100")]
    for name, key in pairs:
        assert peak_flops(name, "bf16-mixed") == DENSE_PEAK_TFLOPS[key] * 1e12, name
    assert peak_flops("NVIDIA H200 NVL", "bf16-mixed") != peak_flops("NVIDIA H200", "bf16-mixed")


# --- the callback's peak, on a GPU faked by name (Lightning's look-up reads the same name) ---

def fake_gpu_trainer(precision: str) -> SimpleNamespace:
    """What ThroughputMonitor.setup and ours read of a Trainer, on a CUDA device."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
                           precision=precision, precision_plugin=MixedPrecision(precision, "cpu"),
                           enable_validation=True, world_size=1,
                           state=SimpleNamespace(stage=RunningStage.TRAINING))


@pytest.fixture
def printed(monkeypatch) -> list[str]:
    lines = []
    monkeypatch.setattr(training.callbacks, "rank_zero_info", lines.append)
    return lines


@pytest.mark.parametrize(("gpu", "precision", "peak", "source"), [
    # no entry in Lightning's table: no MFU at all before
    ("NVIDIA H200", "bf16-mixed", 989.4e12, "NVIDIA H200, bf16 dense peak"),
    # Lightning's figure is the sparse one, 1978.8e12
    ("NVIDIA H100 NVL", "bf16-mixed", 835.5e12, "NVIDIA H100 NVL, bf16 dense peak"),
    ("NVIDIA GeForce RTX 4090", "16-mixed", 165.2e12, "NVIDIA GeForce RTX 4090, fp16 dense peak"),
    # ours has no A10G: Lightning's figure stays
    ("NVIDIA A10G", "bf16-mixed", 125e12, "NVIDIA A10G, Lightning's table"),
])
def test_callback_takes_the_dense_peak_of_the_gpu_in_use(gpu, precision, peak, source,
                                                          monkeypatch, printed):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    callback = Throughput()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.setup(fake_gpu_trainer(precision), None, "fit")
    assert callback.available_flops == pytest.approx(peak, rel=1e-9)
    assert len(callback._throughputs) == 2  # training and validation: each measures against it
    for throughput in callback._throughputs.values():
        assert throughput.available_flops == pytest.approx(peak, rel=1e-9)
    assert printed == [f"MFU against {peak / 1e12:g} TFLOP/s ({source})"]
    if "dense" in source:  # Lightning's "FLOPs not found" would be wrong: the peak is known
        assert not [w for w in caught if "FLOPs" in str(w.message)], caught


def test_callback_takes_the_users_peak_over_the_table_and_prints_it_once(monkeypatch, printed):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    callback = Throughput(peak_flops=5e14)
    for _ in range(2):  # setup runs again for a second fit
        callback.setup(fake_gpu_trainer("bf16-mixed"), None, "fit")
    assert callback.available_flops == 5e14
    assert all(t.available_flops == 5e14 for t in callback._throughputs.values())
    assert printed == ["MFU against 500 TFLOP/s (--throughput.peak_flops)"]


# --- a tiny run on this CPU: MFU only with --throughput.peak_flops, and against it ---

def logged(run) -> list[dict[str, float]]:
    """metrics.csv's rows that have the throughput."""
    with open(run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    return [row for row in rows if "train/device/flops_per_sec" in row]


def test_logged_mfu_is_flops_per_second_over_the_given_peak(text_file, tmp_path):
    peak = 3e9  # FLOP/s; any figure: the MFU is measured against it
    fit(text_file, tmp_path / "with", "--throughput.peak_flops", str(peak))
    rows = logged(run_folders(tmp_path / "with")[0])
    assert rows
    for row in rows:
        assert row["train/device/mfu"] == pytest.approx(row["train/device/flops_per_sec"] / peak,
                                                        rel=1e-6)
        # the FLOPs the module counts: GPT.flops_per_token for each token of a batch
        assert row["train/device/flops_per_sec"] / row["train/device/items_per_sec"] == \
            pytest.approx(tiny_run_flops_per_token(text_file, tmp_path), rel=1e-6)


def tiny_run_flops_per_token(text_file, tmp_path) -> int:
    """GPT.flops_per_token of conftest's tiny run's model (1 layer, 16 wide, T = 16) on this text,
    built by train.py's CLI without training."""
    import train

    cli = train.main(tiny_run(text_file, tmp_path / "built")[1:], run=False)  # (no "fit")
    return cli.model.model.flops_per_token(16)


# --- bench_train's MFU ---

def test_bench_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak():
    assert bench_train.mfu(2000.0, 3e6, 1.2e10) == pytest.approx(0.5)
    assert bench_train.mfu(4000.0, 3e6, 1.2e10) == pytest.approx(1.0)  # twice as fast, twice
    assert bench_train.mfu(2000.0, 3e6, None) is None  # no peak: no MFU


@pytest.mark.parametrize("value", ["0", "-1e12", "nan", "inf"])
def test_bench_refuses_a_peak_that_is_not_a_positive_number_in_one_line(value):
    shown = re.escape(f"{float(value):g}")  # (as a number: 0, -1e+12 ...)
    with pytest.raises(UsageError, match=rf"--peak-flops {shown}: give one device's peak FLOP/s, "
                                         r"above 0") as error:
        bench_train.parse_args([f"--peak-flops={value}"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("peak", [2e9, None])
def test_bench_table_has_the_mfu_of_the_peak_or_says_how_to_give_one(peak, text_file, tmp_path,
                                                                      capsys):
    given = ["--peak-flops", str(peak)] if peak else []  # none: this CPU's peak is unknown
    bench_train.main(["--source", str(text_file), "--variants", "naive:32-true", "--steps", "2",
                      "--warmup", "1", "--repeats", "1", "--threads", "1", *given,
                      "--device", "cpu",  # (a CUDA machine would know its GPU's peak)
                      "--data.cache_dir", str(tmp_path / "cache"),
                      "--data.block_size", "16", "--data.batch_size", "4",
                      "--model.config.n_layer", "1", "--model.config.n_embd", "16",
                      "--model.config.n_head", "2", "--model.val_samples", "0",
                      "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| variant"))
    row = next(line for line in out.splitlines() if line.startswith("| naive:32-true"))
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "),
                     strict=True))
    per_token = int(re.search(r"FLOPs per token .*: ([\d,]+)", out).group(1).replace(",", ""))
    assert per_token == tiny_run_flops_per_token(text_file, tmp_path)  # the same model
    hint = "give one device's peak with --peak-flops"
    if peak is None:
        assert cells["MFU"] == "-" and hint in out
        return
    tokens_per_s = float(cells["tokens/s"].replace(",", ""))
    assert float(cells["MFU"].rstrip("%")) / 100 == pytest.approx(
        tokens_per_s * per_token / peak, rel=0.01)  # (the cells are rounded)
    assert hint not in out


def test_gpu_memory_is_read_on_cuda_devices_only(monkeypatch):
    from training.callbacks import max_memory_gib

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert max_memory_gib(torch.device("cuda", 0)) == 3.0
    assert max_memory_gib(torch.device("cpu")) is None
