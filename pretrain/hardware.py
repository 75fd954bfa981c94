"""One table of accelerators: peak FLOP/s, memory and links, for MFU and for `pretrain plan`.

MFU divides achieved FLOP/s by a peak, so the peak must be the one of the card in the
machine: an H100 PCIe has 76% of an H100 SXM's tensor throughput under the same "H100" in
its name, and a GH200 is not an H200. So `from_device_name` matches the exact names the
drivers report (`torch.cuda.get_device_name`, which is also the ROCm name under ROCm), one
pattern per variant, and an unknown or ambiguous name gets no entry: the caller measures
(`metrics.peak_flops`) rather than guess.

Figures are vendor datasheet values per GPU. FLOP/s are dense: NVIDIA prints the tensor-core
figures of Ampere, Hopper, Ada and Blackwell "with sparsity" (2:4), twice the dense rate we
train at, so the table holds half the printed figure, in whole TFLOP/s as dense rates are
usually quoted (989 for the H100 SXM's 1,979; NVIDIA's whitepaper computes 989.4); AMD
prints dense figures and the sparse ones separately. `fp32` is the non-tensor (CUDA core)
rate, which is what fp32 matmuls get unless TF32 is allowed
(`torch.set_float32_matmul_precision("high")`); AMD's `fp32` is its "FP32 matrix" rate. Link bandwidth is the GPU-to-GPU figure inside a node,
bidirectional, as printed (NVLink, or AMD Infinity Fabric: 7 links x 128 GB/s on an 8-GPU
platform); PCIe-only cards list their PCIe slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

T = 1e12


@dataclass(frozen=True)
class Accelerator:
    name: str  # the key `pretrain plan --gpu-type` takes
    bf16: float | None  # dense tensor FLOP/s; None: no bf16 tensor cores (V100)
    fp16: float
    tf32: float | None
    fp32: float
    memory_gb: float
    memory_tb_s: float
    link: str
    link_gb_s: float
    device_names: tuple[str, ...]  # regexes for torch.cuda.get_device_name, case-insensitive

    def peak(self, precision: str) -> float | None:
        """Dense peak FLOP/s for `precision` in bf16, fp16, tf32, fp32 (None: none listed)."""
        if precision not in ("bf16", "fp16", "tf32", "fp32"):
            raise ValueError(f"unknown precision {precision!r} (bf16, fp16, tf32 or fp32)")
        return getattr(self, precision)

    @property
    def tensor16(self) -> float:
        """The 16-bit tensor peak: bf16, or fp16 where there is no bf16 (V100)."""
        return self.bf16 if self.bf16 is not None else self.fp16


ACCELERATORS: tuple[Accelerator, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5 / PCIe / NVL columns): BF16 and FP16
    # 1,979 / 1,513 / 1,671 TFLOPS, TF32 989 / 756 / 835, with sparsity; FP32 67 / 51 / 60;
    # 80 GB HBM3 3.35 TB/s / 80 GB HBM2e 2.0 TB/s / 94 GB HBM3 3.9 TB/s; NVLink 900 GB/s,
    # PCIe card NVLink bridge 600 GB/s (PCIe Gen5 128 GB/s without one).
    Accelerator(
        "H100-SXM", 989 * T, 989 * T, 494 * T, 67 * T, 80, 3.35, "NVLink 4", 900,
        (r"\bH100 80GB HBM3\b", r"\bH100 SXM"),
    ),
    Accelerator(
        "H100-PCIE", 756 * T, 756 * T, 378 * T, 51 * T, 80, 2.0, "NVLink bridge", 600,
        (r"\bH100 PCIe\b",),
    ),
    Accelerator(
        "H100-NVL", 835 * T, 835 * T, 417 * T, 60 * T, 94, 3.9, "NVLink bridge", 600,
        (r"\bH100 NVL\b",),
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM / NVL): BF16 1,979 / 1,671 TFLOPS, TF32
    # 989 / 835 (sparse); FP32 67 / 60; 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s (NVL: bridge).
    Accelerator(
        "H200-SXM", 989 * T, 989 * T, 494 * T, 67 * T, 141, 4.8, "NVLink 4", 900,
        (r"\bH200\b(?!\s*NVL)",),  # "NVIDIA H200"; the \b keeps out "GH200"
    ),
    Accelerator(
        "H200-NVL", 835 * T, 835 * T, 417 * T, 60 * T, 141, 4.8, "NVLink bridge", 900,
        (r"\bH200 NVL\b",),
    ),
    # NVIDIA GH200 Grace Hopper datasheet: the GPU's tensor figures are the H100 SXM's;
    # 96 GB HBM3 at 4.0 TB/s ("GH200 480GB"; a 144 GB HBM3e version has 4.9 TB/s); NVLink
    # 900 GB/s between superchips.
    Accelerator(
        "GH200", 989 * T, 989 * T, 494 * T, 67 * T, 96, 4.0, "NVLink 4", 900,
        (r"\bGH200\b",),
    ),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 TFLOPS and TF32 156 dense (624 and
    # 312 with sparsity), FP32 19.5, for every variant; HBM2 40 GB 1,555 GB/s, HBM2e 80 GB
    # 1,935 (PCIe) / 2,039 (SXM) GB/s; NVLink 600 GB/s (PCIe: bridge for 2 GPUs, 600 GB/s).
    Accelerator(
        "A100-SXM-40GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 40, 1.555, "NVLink 3", 600,
        (r"\bA100-SXM\d?-40GB\b",),
    ),
    Accelerator(
        "A100-SXM-80GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 80, 2.039, "NVLink 3", 600,
        (r"\bA100-SXM\d?-80GB\b",),
    ),
    Accelerator(
        "A100-PCIE-40GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 40, 1.555, "NVLink bridge", 600,
        (r"\bA100-PCIE-40GB\b",),
    ),
    Accelerator(
        "A100-PCIE-80GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 80, 1.935, "NVLink bridge", 600,
        (r"\bA100 80GB PCIe\b", r"\bA100-PCIE-80GB\b"),
    ),
    # NVIDIA L40S datasheet: BF16/FP16 733 TFLOPS and TF32 366 with sparsity (362.05 and 183
    # dense), FP32 91.6; 48 GB GDDR6 864 GB/s; PCIe Gen4 x16 64 GB/s, no NVLink.
    Accelerator(
        "L40S", 362 * T, 362 * T, 183 * T, 91.6 * T, 48, 0.864, "PCIe Gen4", 64,
        (r"\bL40S\b",),
    ),
    # NVIDIA L4 datasheet: BF16/FP16 242 TFLOPS, TF32 120 (sparse); FP32 30.3; 24 GB 300 GB/s.
    Accelerator(
        "L4", 121 * T, 121 * T, 60 * T, 30.3 * T, 24, 0.3, "PCIe Gen4", 64, (r"\bL4\b",)
    ),
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS fp16 tensor, no bf16 or TF32; FP32 15.7;
    # 32 GB HBM2 900 GB/s; NVLink 300 GB/s.
    Accelerator(
        "V100", None, 125 * T, None, 15.7 * T, 32, 0.9, "NVLink 2", 300, (r"\bV100-SXM2\b",)
    ),
    # NVIDIA HGX B200 and GB200 NVL72 datasheets, "individual Blackwell GPU" rows (B200 /
    # GB200): FP16/BF16 4.5 / 5 PFLOPS and TF32 2.2 / 2.5 PFLOPS with sparsity, FP32 75 / 80
    # TFLOPS, 180 GB HBM3e 7.7 TB/s / 186 GB 8 TB/s, 5th-generation NVLink 1.8 TB/s.
    Accelerator(
        "B200", 2250 * T, 2250 * T, 1100 * T, 75 * T, 180, 7.7, "NVLink 5", 1800,
        (r"\bB200\b",),  # the \b keeps out "GB200"
    ),
    Accelerator(
        "GB200", 2500 * T, 2500 * T, 1250 * T, 80 * T, 186, 8.0, "NVLink 5", 1800,
        (r"\bGB200\b",),
    ),
    # AMD Instinct MI250X datasheet: BF16/FP16 383 TFLOPS, FP32 matrix 95.7 (no TF32); 128 GB
    # HBM2e 3.2 TB/s; Infinity Fabric up to 800 GB/s. ROCm names the OAM card
    # "AMD Instinct MI250X/MI250", which does not say which of the two (MI250: 362 TFLOPS) it
    # is: such a name is left to measurement.
    Accelerator(
        "MI250X", 383 * T, 383 * T, None, 95.7 * T, 128, 3.2, "Infinity Fabric", 800,
        (r"\bMI250X\b(?!\s*/)",),
    ),
    # AMD Instinct MI300X / MI325X datasheets: BF16/FP16 1,307.4 TFLOPS dense (2,614.9 with
    # sparsity), TF32 653.7, FP32 matrix 163.4; 192 GB HBM3 5.3 TB/s / 256 GB HBM3E 6 TB/s;
    # 7 Infinity Fabric links x 128 GB/s. (MI300A, the APU, has other figures: not matched.)
    Accelerator(
        "MI300X", 1307.4 * T, 1307.4 * T, 653.7 * T, 163.4 * T, 192, 5.3, "Infinity Fabric",
        896, (r"\bMI300X\b",),
    ),
    Accelerator(
        "MI325X", 1307.4 * T, 1307.4 * T, 653.7 * T, 163.4 * T, 256, 6.0, "Infinity Fabric",
        896, (r"\bMI325X\b",),
    ),
)  # fmt: skip

# Short names `pretrain plan --gpu-type` also takes: the variant people usually mean.
ALIASES = {"H100": "H100-SXM", "H200": "H200-SXM", "A100": "A100-SXM-80GB"}
BY_NAME = {a.name: a for a in ACCELERATORS}


def by_name(name: str) -> Accelerator:
    """The entry for a table name or alias, in any case, '_' or ' ' for '-'; KeyError if none."""
    key = re.sub(r"[\s_]+", "-", name.strip()).upper()
    return BY_NAME[ALIASES.get(key, key)]


def known_names() -> list[str]:
    return [*BY_NAME, *ALIASES]


def from_device_name(device_name: str) -> Accelerator | None:
    """The entry whose patterns match a driver's device name, or None when no entry, or more
    than one, does (then no datasheet figure can be trusted for it)."""
    found = [
        a
        for a in ACCELERATORS
        if any(re.search(p, device_name, re.IGNORECASE) for p in a.device_names)
    ]
    return found[0] if len(found) == 1 else None
