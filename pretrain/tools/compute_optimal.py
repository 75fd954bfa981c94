"""`pretrain plan --flops F | --gpus N --hours H`: the compute-optimal model size and token
count for a training budget.

Two rules from Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models"
(the Chinchilla paper), both under the usual approximation C = 6 N D (training FLOPs for N
parameters and D tokens; attention FLOPs are ignored):

* Approach 3, the fitted parametric loss (eq. 2; fit in appendix D.2)
      L(N, D) = E + A / N^alpha + B / D^beta,
  minimised under C = 6 N D in closed form (eq. 4):
      N_opt = G (C/6)^a,  D_opt = G^-1 (C/6)^b,
      a = beta / (alpha + beta),  b = alpha / (alpha + beta),
      G = (alpha A / (beta B))^(1 / (alpha + beta)).
  The paper prints E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28. We use the unrounded
  values of its TeX source (Besiroglu et al. 2024, "Chinchilla Scaling: A replication
  attempt", arXiv:2404.10102): they round to the printed ones and, unlike them, reproduce
  the paper's own Approach-3 results (a=0.46, b=0.54 in table 2; about 40B parameters for
  Gopher's 5.76e23 FLOPs). The printed constants give a=0.45 and 32B there.
* About 20 tokens per parameter, as Approach 1's estimates in table 3 have it (20-22 there):
  D = 20 N, so N = sqrt(C / 120).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from pretrain import hardware
from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.progress import fmt_duration

# Dense 16-bit tensor peak FLOP/s per accelerator (bf16; fp16 on V100, which has no bf16),
# from the one table in pretrain.hardware, which the MFU of training runs also uses.
PEAK_FLOPS = {a.name: a.tensor16 for a in hardware.ACCELERATORS}
REFERENCE_GPUS = (8, 64, 512)
TOKENS_PER_PARAM = 20.0
NOTE_6ND = "6ND approximation: attention FLOPs (12 x layers x d_model x seq_len a token) ignored"


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ~ C^a and D_opt ~ C^b (eq. 4)."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising loss(N, D) subject to 6 N D = flops (eq. 4)."""
        a, b = self.exponents
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (flops / 6) ** a, (flops / 6) ** b / g


# Approach 3 as fitted (TeX-source precision) and as printed in appendix D.2.
CHINCHILLA = LossLaw(E=1.69337368, A=406.401018, B=410.722827, alpha=0.33917084, beta=0.2849083)
CHINCHILLA_PRINTED = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def tokens_rule_optimal(flops: float, ratio: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = ratio * N and 6 N D = flops: N = sqrt(flops / (6 ratio))."""
    n = math.sqrt(flops / (6 * ratio))
    return n, ratio * n


def accelerator(gpu_type: str) -> hardware.Accelerator:
    """The table entry for a --gpu-type (case-insensitive; H100 = H100-SXM, H200 = H200-SXM;
    SLURM GRES names too); ConfigError naming the known ones if there is none."""
    return hardware.lookup(gpu_type, "--gpu-type")


def peak_flops(gpu_type: str) -> float:
    """Dense bf16 (V100: fp16) peak FLOP/s of a GPU type; ConfigError if unknown."""
    return accelerator(gpu_type).tensor16


def budget_flops(gpus: int, hours: float, peak: float, mfu: float) -> float:
    """FLOPs that `gpus` GPUs of `peak` FLOP/s deliver in `hours` at utilisation `mfu`."""
    return gpus * hours * 3600 * peak * mfu


@dataclass(frozen=True)
class ShippedConfig:
    name: str
    params: int
    tokens_per_step: int  # train.global_batch_size * data.seq_len


def read_configs(folder: Path) -> list[ShippedConfig]:
    """Every dense folder/*.yaml, loaded with load_config and sized with count_params. The
    Chinchilla rule (20 tokens per parameter, 6ND FLOPs) is a dense model's: a mixture of
    experts is left out (neither its total nor its active count is that model's N)."""
    from pretrain.model import count_params

    paths = sorted(Path(folder).glob("*.yaml"))
    if not paths:
        raise ConfigError(f"no *.yaml configs in {folder}")
    out = []
    for p in paths:
        cfg = load_config(p)
        if cfg.model.moe.enabled:
            continue
        tps = cfg.train.global_batch_size * cfg.data.seq_len
        out.append(ShippedConfig(p.stem, count_params(cfg.model), tps))
    return out


def nearest_config(n: float, configs: list[ShippedConfig]) -> ShippedConfig:
    """The config whose parameter count is nearest to n in log space (ratio, not difference)."""
    return min(configs, key=lambda c: abs(math.log(c.params / n)))


def fmt_flops(x: float) -> str:
    """1.2345e21 -> '1.23e21'."""
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exp)}"


def fmt_count(x: float) -> str:
    """3 significant digits with K/M/B/T: 2.8e9 -> '2.8B', 5.7e10 -> '57B', 2.16e14 -> '216T'."""
    x = float(f"{x:.3g}")  # round first, so 999.7e9 becomes 1T and not 1e+03B
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            v = x / div
            return f"{v:.3g}{suffix}" if v < 1000 else f"{v:,.0f}{suffix}"
    return f"{x:.3g}"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain plan",
        description="Compute-optimal parameters and tokens for a FLOP budget (Chinchilla).",
    )
    p.add_argument("--flops", type=float, help="training budget in FLOPs, e.g. 1e21")
    p.add_argument("--gpus", type=int, help="number of GPUs (with --hours and --gpu-type)")
    p.add_argument("--hours", type=float, help="wall-clock hours of training")
    p.add_argument(
        "--gpu-type",
        help=f"one of {', '.join(hardware.known_names())} (case-insensitive)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (0, 1]")
    p.add_argument("--configs", type=Path, default=Path(__file__).parents[2] / "configs")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    for name in ("flops", "gpus", "hours"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name} must be positive, got {value}")
    if args.flops is not None and args.hours is not None:
        raise ConfigError("give --flops or --hours, not both (the hours follow from the FLOPs)")
    if args.flops is None:
        given = {"--gpus": args.gpus, "--hours": args.hours, "--gpu-type": args.gpu_type}
        missing = ", ".join(flag for flag, value in given.items() if value is None)
        if missing:
            raise ConfigError(
                f"give --flops, or --gpus, --hours and --gpu-type (missing {missing})"
            )
    elif args.gpus is not None and args.gpu_type is None:
        raise ConfigError("--gpus needs --gpu-type to estimate the wall time")
    return args


def main(argv: list[str]) -> int:
    """`pretrain plan --flops F | --gpus N --hours H`: the compute-optimal plan for a
    budget (`pretrain plan CONFIG ...` is the planner's, pretrain.planner.cli). ConfigError
    for bad input."""
    args = _parse(argv)
    card = accelerator(args.gpu_type or "H100")
    peak, gpu = card.tensor16, card.name
    if args.flops is None:
        flops = budget_flops(args.gpus, args.hours, peak, args.mfu)
        source = f" = {args.gpus} x {gpu} ({peak / 1e12:g} TFLOP/s) x {args.hours:g} h"
        source += f" x MFU {args.mfu:g}"
    else:
        flops, source = args.flops, ""
    configs = read_configs(args.configs)
    n3, d3 = CHINCHILLA.optimal(flops)
    n20, d20 = tokens_rule_optimal(flops)
    best = nearest_config(n20, configs)
    d_best = flops / (6 * best.params)
    steps = math.ceil(d_best / best.tokens_per_step)

    print(f"compute: {fmt_flops(flops)} FLOPs{source}")
    print(f"  ({NOTE_6ND}; L(N,D): the fitted law's predicted loss)")
    rows = [
        ("Chinchilla fitted law (approach 3)", n3, d3),
        (f"{TOKENS_PER_PARAM:g} tokens per parameter", n20, d20),
        (f"nearest config: {best.name}", best.params, d_best),
    ]
    print(f"{'':36} {'params':>8} {'tokens':>8} {'tok/param':>9} {'L(N,D)':>8}")
    for label, n, d in rows:
        loss = CHINCHILLA.loss(n, d)
        print(f"{label:36} {fmt_count(n):>8} {fmt_count(d):>8} {d / n:>9.1f} {loss:>8.3f}")
    print(
        f"config {best.name} is nearest in log space to the {TOKENS_PER_PARAM:g}-tokens rule's "
        f"{fmt_count(n20)}; for this budget train it for {steps:,} steps of "
        f"{best.tokens_per_step:,} tokens (train.max_steps={steps})"
    )
    if args.gpus is not None:
        tput = args.gpus * peak * args.mfu / (6 * best.params)
        secs = flops / (args.gpus * peak * args.mfu)
        note = " (given)" if args.flops is None else ""
        print(
            f"wall time on {args.gpus} x {gpu} at MFU {args.mfu:g}: "
            f"{fmt_duration(secs)}{note}; throughput assumed for {best.name}: "
            f"{fmt_count(tput)} tokens/s (= gpus x peak x MFU / (6 N))"
        )
    else:
        print(f"wall time at MFU {args.mfu:g} (reference setups; --gpus to pick one):")
        for n_gpus in REFERENCE_GPUS:
            secs = flops / (n_gpus * peak * args.mfu)
            print(f"  {n_gpus:>4} x {gpu}: {fmt_duration(secs)}")
    return 0
