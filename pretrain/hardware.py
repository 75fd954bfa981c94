"""One table of accelerators: peak FLOP/s, memory and links, for MFU and for `pretrain plan`.

MFU divides achieved FLOP/s by a peak, so the peak must be the one of the card in the
machine: an H100 PCIe has 76% of an H100 SXM's tensor throughput under the same "H100" in
its name, and a GH200 is not an H200. So `from_device_name` matches the exact names the
drivers report (`torch.cuda.get_device_name`, which is also the ROCm name under ROCm), one
pattern per variant, and an unknown or ambiguous name gets no entry: the caller measures
(`pretrain.train.peak`) rather than guess.

Figures are vendor datasheet values per GPU. FLOP/s are dense: NVIDIA prints the tensor-core
figures of Ampere, Hopper, Ada and Blackwell "with sparsity" (2:4), twice the dense rate we
train at, so the table holds half the printed figure, in whole TFLOP/s as dense rates are
usually quoted (989 for the H100 SXM's 1,979; NVIDIA's whitepaper computes 989.4); AMD
prints dense figures and the sparse ones separately. `fp32` is the non-tensor (CUDA core)
rate, which is what fp32 matmuls get unless TF32 is allowed
(`torch.set_float32_matmul_precision("high")`); AMD's `fp32` is its "FP32 matrix" rate. Link bandwidth is the GPU-to-GPU figure inside a node,
bidirectional, as printed (NVLink, or AMD Infinity Fabric: 7 links x 128 GB/s on an 8-GPU
platform); PCIe-only cards list their PCIe slot.

Two figures are not on a datasheet, and the planner needs both:

* `usable_gib`, the memory a process can allocate: what the driver reports as the card's
  total (`torch.cuda.mem_get_info()[1]`, the "total capacity" of torch's out-of-memory
  message), below the nominal size (the driver keeps some; ECC takes a share of GDDR).
  An H100 80GB reports 79.11 GiB, not 80 (nor 74.5, 80e9 bytes). The CUDA context, cuBLAS
  and NCCL buffers come out of it, and the planner's headroom counts them.
* `network`, the node a card is usually built into, and its NICs for GPU traffic between
  nodes (storage and management ports left out): a ring collective across nodes leaves a
  node through all of them at once (one ring per NIC), so the planner models the node's
  NIC count x speed, not one GPU's port. `pretrain plan --nics-per-node/--nic-gbps`
  override it for a cluster built otherwise.

Names: `by_name` takes the table's names, a few short ones (`H100` is the SXM card), and
the names SLURM's GPU autodetection (AutoDetect=nvml) gives GRES types: the driver's
name lower-cased with spaces as underscores (`nvidia_h100_80gb_hbm3`,
`nvidia_a100-sxm4-40gb`), matched by the same patterns as the driver's name. A family
name whose cards differ in memory (`a100`: 40 or 80 GB) is refused with the choices: a
fit check on the wrong one is wrong in one direction or the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pretrain.errors import ConfigError

T = 1e12


@dataclass(frozen=True)
class Node:
    """A reference node: its GPU count and the NICs that carry GPU traffic between nodes."""

    platform: str
    gpus: int
    nics: int
    nic_gbit_s: float

    def nics_for(self, gpus_per_node: int) -> float:
        """NICs for a node of `gpus_per_node` of these GPUs: this node's NICs per GPU."""
        return self.nics * gpus_per_node / self.gpus


# DGX H100 / H200 datasheets: 8x single-port ConnectX-7 VPI, up to 400 Gb/s InfiniBand or
# Ethernet (the two dual-port ConnectX-7 cards are for storage). DGX B200: the same 8 x 400.
DGX_H100 = Node("DGX H100", 8, 8, 400)
DGX_H200 = Node("DGX H200", 8, 8, 400)
DGX_B200 = Node("DGX B200", 8, 8, 400)
# DGX A100 datasheet: 8x single-port ConnectX-6 VPI, 200 Gb/s HDR InfiniBand.
DGX_A100 = Node("DGX A100", 8, 8, 200)
# DGX-1 (V100): 4x 100 Gb/s EDR InfiniBand for 8 GPUs.
DGX_1 = Node("DGX-1", 8, 4, 100)
# GB200 NVL72 compute tray: 4 GPUs (2 superchips), one 400 Gb/s ConnectX-7 per GPU; GH200
# systems (MGX): one 400 Gb/s NIC per superchip.
GB200_TRAY = Node("GB200 NVL72 tray", 4, 4, 400)
GH200_NODE = Node("GH200 MGX", 1, 1, 400)
# PCIe servers, NVIDIA's enterprise reference architecture 2-8-5-200: 8 GPUs, 4 east-west
# 400 Gb/s NICs (200 Gb/s per GPU).
PCIE_2_8_5 = Node("PCIe 2-8-5-200", 8, 4, 400)
# AMD Instinct MI300X / MI325X platforms: 8 GPUs, one 400 Gb/s NIC each. MI250X: HPE Cray
# EX235a (Frontier), 4 MI250X and 4 Slingshot 200 Gb/s NICs.
MI300_PLATFORM = Node("MI300X platform", 8, 8, 400)
EX235A = Node("HPE Cray EX235a", 4, 4, 200)


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
    usable_gib: float = field(kw_only=True)  # what the driver reports as total (module doc)
    network: Node = field(kw_only=True)

    def peak(self, precision: str) -> float | None:
        """Dense peak FLOP/s for `precision` in bf16, fp16, tf32, fp32 (None: none listed)."""
        if precision not in ("bf16", "fp16", "tf32", "fp32"):
            raise ValueError(f"unknown precision {precision!r} (bf16, fp16, tf32 or fp32)")
        return getattr(self, precision)

    @property
    def capacity_bytes(self) -> int:
        """What a process can allocate on the card: the usable, not the nominal, memory."""
        return int(self.usable_gib * 2**30)

    @property
    def tensor16(self) -> float:
        """The 16-bit tensor peak: bf16, or fp16 where there is no bf16 (V100)."""
        return self.bf16 if self.bf16 is not None else self.fp16


# usable_gib: the "total capacity" torch's out-of-memory message prints (mem_get_info's
# total), as users posted it: H100 80GB HBM3 79.11 GiB (e.g. vLLM runs on H100 80GB nodes;
# nvidia-smi's total is 81,559 MiB = 79.65 GiB, modal-labs/modal-client PR 2797), A100 80GB
# 79.15, A100 40GB 39.39, H200 139.80 and B200 178.35 (8-GPU H200 / B200 training logs),
# L40S 44.39 and L4 22.03 (GDDR6 with ECC on), V100 32GB 31.73, MI300X 191.98 and MI325X
# 255.98 (HIP). Where no report was found (H100 PCIe and NVL, H200 NVL, GH200, GB200,
# MI250X) it is 98.5% of the nominal size, the least share of the cards above with HBM
# (A100 40GB: 39.39 / 40): an estimate, rounded down.
ACCELERATORS: tuple[Accelerator, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5 / PCIe / NVL columns): BF16 and FP16
    # 1,979 / 1,513 / 1,671 TFLOPS, TF32 989 / 756 / 835, with sparsity; FP32 67 / 51 / 60;
    # 80 GB HBM3 3.35 TB/s / 80 GB HBM2e 2.0 TB/s / 94 GB HBM3 3.9 TB/s; NVLink 900 GB/s,
    # PCIe card NVLink bridge 600 GB/s (PCIe Gen5 128 GB/s without one).
    Accelerator(
        "H100-SXM", 989 * T, 989 * T, 494 * T, 67 * T, 80, 3.35, "NVLink 4", 900,
        (r"\bH100 80GB HBM3\b", r"\bH100 SXM"),
        usable_gib=79.11, network=DGX_H100,
    ),
    Accelerator(
        "H100-PCIE", 756 * T, 756 * T, 378 * T, 51 * T, 80, 2.0, "NVLink bridge", 600,
        (r"\bH100 PCIe\b",),
        usable_gib=78.8, network=PCIE_2_8_5,
    ),
    Accelerator(
        "H100-NVL", 835 * T, 835 * T, 417 * T, 60 * T, 94, 3.9, "NVLink bridge", 600,
        (r"\bH100 NVL\b",),
        usable_gib=92.5, network=PCIE_2_8_5,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM / NVL): BF16 1,979 / 1,671 TFLOPS, TF32
    # 989 / 835 (sparse); FP32 67 / 60; 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s (NVL: bridge).
    Accelerator(
        "H200-SXM", 989 * T, 989 * T, 494 * T, 67 * T, 141, 4.8, "NVLink 4", 900,
        (r"\bH200\b(?!\s*NVL)",),  # "NVIDIA H200"; the \b keeps out "GH200"
        usable_gib=139.80, network=DGX_H200,
    ),
    Accelerator(
        "H200-NVL", 835 * T, 835 * T, 417 * T, 60 * T, 141, 4.8, "NVLink bridge", 900,
        (r"\bH200 NVL\b",),
        usable_gib=138.8, network=PCIE_2_8_5,
    ),
    # NVIDIA GH200 Grace Hopper datasheet: the GPU's tensor figures are the H100 SXM's;
    # 96 GB HBM3 at 4.0 TB/s ("GH200 480GB"; a 144 GB HBM3e version has 4.9 TB/s); NVLink
    # 900 GB/s between superchips.
    Accelerator(
        "GH200", 989 * T, 989 * T, 494 * T, 67 * T, 96, 4.0, "NVLink 4", 900,
        (r"\bGH200\b",),
        usable_gib=94.5, network=GH200_NODE,
    ),
    # NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 TFLOPS and TF32 156 dense (624 and
    # 312 with sparsity), FP32 19.5, for every variant; HBM2 40 GB 1,555 GB/s, HBM2e 80 GB
    # 1,935 (PCIe) / 2,039 (SXM) GB/s; NVLink 600 GB/s (PCIe: bridge for 2 GPUs, 600 GB/s).
    Accelerator(
        "A100-SXM-40GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 40, 1.555, "NVLink 3", 600,
        (r"\bA100-SXM\d?-40GB\b",),
        usable_gib=39.39, network=DGX_A100,
    ),
    Accelerator(
        "A100-SXM-80GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 80, 2.039, "NVLink 3", 600,
        (r"\bA100-SXM\d?-80GB\b",),
        usable_gib=79.15, network=DGX_A100,
    ),
    Accelerator(
        "A100-PCIE-40GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 40, 1.555, "NVLink bridge", 600,
        (r"\bA100-PCIE-40GB\b",),
        usable_gib=39.39, network=PCIE_2_8_5,
    ),
    Accelerator(
        "A100-PCIE-80GB", 312 * T, 312 * T, 156 * T, 19.5 * T, 80, 1.935, "NVLink bridge", 600,
        (r"\bA100 80GB PCIe\b", r"\bA100-PCIE-80GB\b"),
        usable_gib=79.15, network=PCIE_2_8_5,
    ),
    # NVIDIA L40S datasheet: BF16/FP16 733 TFLOPS and TF32 366 with sparsity (362.05 and 183
    # dense), FP32 91.6; 48 GB GDDR6 864 GB/s; PCIe Gen4 x16 64 GB/s, no NVLink.
    Accelerator(
        "L40S", 362 * T, 362 * T, 183 * T, 91.6 * T, 48, 0.864, "PCIe Gen4", 64,
        (r"\bL40S\b",),
        usable_gib=44.39, network=PCIE_2_8_5,
    ),
    # NVIDIA L4 datasheet: BF16/FP16 242 TFLOPS, TF32 120 (sparse); FP32 30.3; 24 GB 300 GB/s.
    Accelerator(
        "L4", 121 * T, 121 * T, 60 * T, 30.3 * T, 24, 0.3, "PCIe Gen4", 64, (r"\bL4\b",),
        usable_gib=22.03, network=PCIE_2_8_5,
    ),
    # NVIDIA V100 datasheet (SXM2): 125 TFLOPS fp16 tensor, no bf16 or TF32; FP32 15.7;
    # 32 GB HBM2 900 GB/s; NVLink 300 GB/s.
    Accelerator(
        "V100", None, 125 * T, None, 15.7 * T, 32, 0.9, "NVLink 2", 300,
        (r"\bV100-SXM2-32GB\b",),  # the 16 GB card is another entry's (none yet)
        usable_gib=31.73, network=DGX_1,
    ),
    # NVIDIA HGX B200 and GB200 NVL72 datasheets, "individual Blackwell GPU" rows (B200 /
    # GB200): FP16/BF16 4.5 / 5 PFLOPS and TF32 2.2 / 2.5 PFLOPS with sparsity, FP32 75 / 80
    # TFLOPS, 180 GB HBM3e 7.7 TB/s / 186 GB 8 TB/s, 5th-generation NVLink 1.8 TB/s.
    Accelerator(
        "B200", 2250 * T, 2250 * T, 1100 * T, 75 * T, 180, 7.7, "NVLink 5", 1800,
        (r"\bB200\b",),  # the \b keeps out "GB200"
        usable_gib=178.35, network=DGX_B200,
    ),
    Accelerator(
        "GB200", 2500 * T, 2500 * T, 1250 * T, 80 * T, 186, 8.0, "NVLink 5", 1800,
        (r"\bGB200\b",),
        usable_gib=183.2, network=GB200_TRAY,
    ),
    # AMD Instinct MI250X datasheet: BF16/FP16 383 TFLOPS, FP32 matrix 95.7 (no TF32); 128 GB
    # HBM2e 3.2 TB/s; Infinity Fabric up to 800 GB/s. ROCm names the OAM card
    # "AMD Instinct MI250X/MI250", which does not say which of the two (MI250: 362 TFLOPS) it
    # is: such a name is left to measurement.
    Accelerator(
        "MI250X", 383 * T, 383 * T, None, 95.7 * T, 128, 3.2, "Infinity Fabric", 800,
        (r"\bMI250X\b(?!\s*/)",),
        usable_gib=126.0, network=EX235A,
    ),
    # AMD Instinct MI300X / MI325X datasheets: BF16/FP16 1,307.4 TFLOPS dense (2,614.9 with
    # sparsity), TF32 653.7, FP32 matrix 163.4; 192 GB HBM3 5.3 TB/s / 256 GB HBM3E 6 TB/s;
    # 7 Infinity Fabric links x 128 GB/s. (MI300A, the APU, has other figures: not matched.)
    Accelerator(
        "MI300X", 1307.4 * T, 1307.4 * T, 653.7 * T, 163.4 * T, 192, 5.3, "Infinity Fabric",
        896, (r"\bMI300X\b",),
        usable_gib=191.98, network=MI300_PLATFORM,
    ),
    Accelerator(
        "MI325X", 1307.4 * T, 1307.4 * T, 653.7 * T, 163.4 * T, 256, 6.0, "Infinity Fabric",
        896, (r"\bMI325X\b",),
        usable_gib=255.98, network=MI300_PLATFORM,
    ),
)  # fmt: skip

# Short names `pretrain plan --gpu-type` also takes: the variant people usually mean, where
# the variants share their memory size (an H100 PCIe has the SXM card's 80 GB). No "A100":
# its variants have 40 or 80 GB.
ALIASES = {"H100": "H100-SXM", "H200": "H200-SXM"}
BY_NAME = {a.name: a for a in ACCELERATORS}


def by_name(name: str) -> Accelerator:
    """The entry for a table name or alias (any case, '_' or ' ' for '-'), or for a driver's
    device name as SLURM's GRES autodetection writes it (`nvidia_h100_80gb_hbm3`). KeyError
    whose message is one line: the choices for a family name (`a100`), else "unknown"."""
    key = re.sub(r"[\s_]+", "-", name.strip()).upper()
    if card := BY_NAME.get(ALIASES.get(key, key)):
        return card
    if card := from_device_name(name.replace("_", " ")):
        return card
    choices = [n for n in BY_NAME if n.startswith(key + "-")]
    if len(choices) > 1:
        raise KeyError(
            f"{name!r} is ambiguous: {' or '.join(choices)} (their memory differs): name one"
        )
    raise KeyError(f"{name!r} is not a GPU type the planner knows")


def known_names() -> list[str]:
    return [*BY_NAME, *ALIASES]


def lookup(name: str, source: str, advice: str = "") -> Accelerator:
    """`by_name`, or a one-line ConfigError: `source` (the flag, or where the name came
    from), what is wrong with the name, the names known, then `advice`."""
    try:
        return by_name(name)
    except KeyError as e:
        known = ", ".join(known_names())
        raise ConfigError(
            f"{source} {e.args[0]} (known: {known}, or a SLURM GRES name such as "
            f"nvidia_h100_80gb_hbm3){advice}"
        ) from None


def from_device_name(device_name: str) -> Accelerator | None:
    """The entry whose patterns match a driver's device name, or None when no entry, or more
    than one, does (then no datasheet figure can be trusted for it)."""
    found = [
        a
        for a in ACCELERATORS
        if any(re.search(p, device_name, re.IGNORECASE) for p in a.device_names)
    ]
    return found[0] if len(found) == 1 else None
