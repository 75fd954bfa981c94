"""The MFU denominator on GPUs (the hardware table, or measured and kept as the best seen;
a CPU's is in test_peak.py), and training-step metrics read off the device in batches,
with non-finite steps skipped on it."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pretrain.train.metrics import PendingStep, StepClock, moe_fields, read_pending
from pretrain.train.peak import gpu_peak_flops, gpu_precision, measure_gpu_matmul_flops
from tests.helpers.runs import REPO

# ---------------------------------------------------------------- the hardware table
# Names as the drivers report them (torch.cuda.get_device_name; ROCm's for AMD).
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-PCIE",
    "NVIDIA H100 NVL": "H100-NVL",
    "NVIDIA H200": "H200-SXM",
    "NVIDIA H200 NVL": "H200-NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-40GB": "A100-SXM-40GB",
    "NVIDIA A100-SXM4-80GB": "A100-SXM-80GB",
    "NVIDIA A100-PCIE-40GB": "A100-PCIE-40GB",
    "NVIDIA A100 80GB PCIe": "A100-PCIE-80GB",
    "NVIDIA L40S": "L40S",
    "NVIDIA L4": "L4",
    "Tesla V100-SXM2-32GB": "V100",
    "NVIDIA B200": "B200",
    "NVIDIA GB200": "GB200",
    "AMD Instinct MI250X": "MI250X",
    "AMD Instinct MI300X": "MI300X",
    "AMD Instinct MI300X VF": "MI300X",
    "AMD Instinct MI325X": "MI325X",
}
# Names the table must not claim: other cards, and one that could be either of two.
UNKNOWN_NAMES = [
    "NVIDIA L40",
    "NVIDIA GeForce RTX 4090",
    "Tesla V100-PCIE-16GB",
    "AMD Instinct MI300A",
    "AMD Instinct MI250X/MI250",
    "gfx942",
]


def test_device_names_pick_their_exact_variant():
    from pretrain import hardware

    for name, entry in DEVICE_NAMES.items():
        card = hardware.from_device_name(name)
        assert card is not None and card.name == entry, name
    for name in UNKNOWN_NAMES:
        assert hardware.from_device_name(name) is None, name
    # What a substring match got wrong: PCIe/NVL cards are not SXM, GH200 is not H200.
    sxm = hardware.by_name("H100-SXM").bf16
    assert hardware.from_device_name("NVIDIA H100 PCIe").bf16 == 756e12 < sxm
    assert hardware.from_device_name("NVIDIA H100 NVL").bf16 == 835e12 < sxm
    assert hardware.from_device_name("NVIDIA GH200 480GB").memory_gb == 96


def test_table_holds_dense_datasheet_figures():
    from pretrain import hardware

    h100 = hardware.by_name("h100")  # alias: the SXM card
    assert (h100.name, h100.bf16, h100.tf32, h100.fp32) == ("H100-SXM", 989e12, 494e12, 67e12)
    assert (h100.memory_gb, h100.memory_tb_s, h100.link_gb_s) == (80, 3.35, 900)
    # Blackwell: half the per-GPU figures NVIDIA prints with sparsity (4.5 and 5 PFLOPS).
    assert hardware.by_name("B200").bf16 == 2.25e15
    assert hardware.by_name("GB200").bf16 == 2.5e15
    assert hardware.by_name("MI300X").bf16 == hardware.by_name("MI325X").bf16 == 1307.4e12
    assert hardware.by_name("mi325x").memory_gb == 256
    with pytest.raises(KeyError, match="ambiguous"):  # 40 or 80 GB
        hardware.by_name("a100")
    assert hardware.by_name("V100").bf16 is None and hardware.by_name("V100").tensor16 == 125e12
    for card in hardware.ACCELERATORS:
        assert card.fp32 < card.tensor16, card.name  # tensor cores beat the fp32 units
        if card.tf32 is not None:
            assert card.fp32 < card.tf32 < card.tensor16, card.name
        assert all(hardware.from_device_name(_spelled(p)) is card for p in card.device_names)
    with pytest.raises(ValueError, match="fp8"):
        h100.peak("fp8")


def _spelled(pattern: str) -> str:
    """A device name a pattern is written to match (its literal text)."""
    return re.sub(r"\\b|\(\?!.*?\)|\\s\*|\\d\?", "", pattern).replace("\\", "")


def test_plan_and_mfu_read_the_same_table():
    from pretrain import hardware
    from pretrain.tools import compute_optimal

    table = {c.name: c.tensor16 for c in hardware.ACCELERATORS}
    assert table == compute_optimal.PEAK_FLOPS
    assert compute_optimal.peak_flops("h100-pcie") == 756e12
    assert (
        compute_optimal.peak_flops("H100")
        == hardware.from_device_name("NVIDIA H100 80GB HBM3").bf16
    )


def test_gpu_peak_is_the_datasheet_or_else_measured_once_per_gpu_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path))
    measured = []

    def measure(value):
        def run():
            measured.append(value)
            return value

        return run

    flops, source = gpu_peak_flops("NVIDIA H100 PCIe", "bf16", measure(1.0))
    assert (flops, measured) == (756e12, []) and "H100-PCIE datasheet" in source
    flops, source = gpu_peak_flops("NVIDIA H100 80GB HBM3", "tf32", measure(1.0))
    assert flops == 494e12 and measured == []
    # No datasheet figure: measured, and cached under the GPU's name as the best seen.
    flops, source = gpu_peak_flops("NVIDIA L40", "bf16", measure(180e12))
    assert flops == 180e12 and "measured bf16 matmul peak" in source and "L40" in source
    assert gpu_peak_flops("NVIDIA L40", "bf16", measure(150e12))[0] == 180e12  # busy GPU
    assert gpu_peak_flops("V100-PCIE", "bf16", measure(5e12))[0] == 5e12  # no bf16 figure
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    build = f"torch {torch.__version__}"
    assert cache == {f"NVIDIA L40|cuda|bf16|{build}": 180e12, f"V100-PCIE|cuda|bf16|{build}": 5e12}


def test_fp32_peak_column_follows_the_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gpu_precision("fp32") == "fp32" and gpu_precision("bf16") == "bf16"
        torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32 tensor cores
        assert gpu_precision("fp32") == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measured_gpu_peak_is_a_sustained_tensor_core_rate():
    from pretrain import hardware

    device = torch.device("cuda")
    flops = measure_gpu_matmul_flops(device, torch.bfloat16)
    card = hardware.from_device_name(torch.cuda.get_device_name(device))
    assert flops > 20e12  # every bf16 tensor-core GPU; a launch-bound loop is far below
    if card is not None:  # large matmuls reach most of the datasheet figure, never above it
        assert 0.4 * card.bf16 < flops < 1.05 * card.bf16


# ---------------------------------------------------------------- steps read in batches
def test_pending_steps_are_read_exactly_in_one_go():
    clock = StepClock(torch.device("cpu"))
    losses = torch.tensor([2.5, float("nan"), 1.0 / 3.0])
    norms = torch.tensor([0.1, float("inf"), 7.0], dtype=torch.bfloat16)
    steps = []
    for i in range(3):
        started = clock.mark()
        steps.append(PendingStep(i + 1, 1e-3, 64, 0.0, 0.1, 0.0, losses[i], norms[i], started, clock.mark()))  # fmt: skip
    read = read_pending(steps)
    assert [r[0] for r in read[::2]] == [losses[0].item(), losses[2].item()]  # exact floats
    assert math.isnan(read[1][0]) and read[1][1] == math.inf
    assert [r[1] for r in read[::2]] == [norms[0].item(), norms[2].item()]
    assert all(r[2] >= 0 for r in read) and read_pending([]) == []
    assert all(r[3] is None for r in read)  # a dense model's steps


def test_moe_statistics_are_read_with_their_step_in_the_same_copy():
    clock = StepClock(torch.device("cpu"))
    moe = torch.tensor([[1.25, 0.5, 3.0, 0.01], [2.0, 0.25, 4.0, 0.02]])
    dense = PendingStep(1, 1e-3, 64, 0.0, 0.1, 0.0, torch.tensor(2.0), torch.tensor(0.5), clock.mark(), clock.mark())  # fmt: skip
    mixed = PendingStep(2, 1e-3, 64, 0.0, 0.1, 0.0, torch.tensor(1.5), torch.tensor(0.25), clock.mark(), clock.mark(), moe)  # fmt: skip
    (a, b, c) = read_pending([mixed, dense, mixed])
    assert a[:2] == (1.5, 0.25) and b[:2] == (2.0, 0.5) and c[:2] == (1.5, 0.25)
    assert a[3] == c[3] == moe.double().tolist() and b[3] is None
    fields = moe_fields(a[3], [1, 3])
    assert fields["moe_imbalance"] == 2.0 and fields["moe_z_loss"] == 3.5
    assert fields["moe_layers"]["3"]["bias_range"] == moe[1, 3].item()


def _strategy(impl: str, **extra):
    from pretrain.config.load import load_config
    from pretrain.parallel import SingleStrategy

    cfg = load_config(
        REPO / "configs/tiny.yaml",
        ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=null",
         "model.vocab_size=64", "model.max_seq_len=16", "data.seq_len=16", f"optim.impl={impl}",
         "parallel.device=cpu"],
    )  # fmt: skip
    s = SingleStrategy(cfg)
    s.setup()
    for key, value in extra.items():
        setattr(s, key, value)
    return s


def _train(s, tokens: torch.Tensor, poison: bool = False) -> torch.Tensor:
    loss = s.forward(tokens).float().square().mean()
    (loss * float("nan") if poison else loss).backward()
    return s.step(1.0)


def _state(s) -> list[torch.Tensor]:
    opt = [v.clone() for st in s.optimizer.state.values() for v in st.values()]
    return [p.detach().clone() for p in s.model.parameters()] + opt


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_a_non_finite_step_leaves_weights_and_adamw_state_untouched(impl):
    s = _strategy(impl)
    batches = torch.randint(0, 64, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    _train(s, batches[0])
    before = _state(s)
    assert not math.isfinite(float(_train(s, batches[1], poison=True)))
    after = _state(s)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert math.isfinite(float(_train(s, batches[2])))
    assert not all(torch.equal(a, b) for a, b in zip(_state(s), before, strict=True))  # trains on


def test_the_fused_skip_on_the_device_equals_the_host_checked_one():
    batches = torch.randint(0, 64, (4, 2, 16), generator=torch.Generator().manual_seed(1))
    device, host = _strategy("fused"), _strategy("fused", host_sync_skip=True)
    for i, tokens in enumerate(batches):
        for s in (device, host):
            _train(s, tokens, poison=i == 1)
    assert all(torch.equal(a, b) for a, b in zip(_state(device), _state(host), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_are_timed_by_events_and_read_in_one_copy():
    device = torch.device("cuda")
    clock = StepClock(device)
    a = torch.randn(4096, 4096, device=device)
    started = clock.mark()
    for _ in range(10):
        a = a @ a / 4096  # queued: the host returns long before the device is done
    loss, norm = a.mean(), a.norm()
    step = PendingStep(1, 1e-3, 64, 0.0, 0.1, 0.0, loss, norm, started, clock.mark())
    ((read_loss, read_norm, seconds, _),) = read_pending([step])
    assert (read_loss, read_norm) == (loss.item(), norm.item()) and seconds > 0
