"""Mixture of experts: a router, routed experts computed as grouped matmuls, shared experts.

A `MoE` replaces a block's MLP (`model.moe` says which blocks). Each token's router scores
(softmax or sigmoid of a linear map, fp32) pick its `top_k` experts; its output is the
weighted sum of those experts' SwiGLUs, plus the shared experts' (optionally gated, as in
Qwen2-MoE). Dropless: every token reaches every expert it picked, whatever the load. The
token copies are sorted by expert and each expert multiplies its contiguous rows:

- `torch._grouped_mm`: one kernel for all experts, offsets on the device (no host sync),
  where it runs on the weights' device and dtype (probed once, at the first forward, and
  logged), with 16-byte aligned rows;
- otherwise a loop of one matmul per expert (which reads the counts on the host).

Balancing (model.moe.balance):
- bias (auxiliary-loss-free, DeepSeek-V3): a per-expert bias, added to the scores only to
  choose the experts (the weights stay the unbiased scores), moved after each optimizer
  step by `bias_update_rate` towards balance: up for an expert under the mean load, down
  above it. The loads are the step's token counts over every data-parallel rank, so all
  ranks route alike (`update_bias`); the bias is a buffer, saved in checkpoints.
- aux: E x sum_i f_i P_i (f_i the share of token copies sent to expert i, P_i its mean
  router probability; 1 when balanced; Switch Transformer, Mixtral), times aux_loss_coef.
- the router z-loss: mean squared log-sum-exp of the router logits, times z_loss_coef.
The auxiliary losses only add gradients: `Transformer.forward` adds `aux - aux.detach()`
to the loss, so the reported loss stays the cross-entropy itself.

Expert parallelism (parallel/expert_parallel.py) sets `expert_runner`: it sends the sorted
copies to the ranks holding their experts with an all-to-all and brings the outputs back;
without it, the experts run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.model.config import ModelConfig
from pretrain.model.mlp import SwiGLU

log = logging.getLogger("pretrain")

# (device type, dtype) -> whether torch._grouped_mm runs there (forward and backward).
_GROUPED_MM_RUNS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward on `device` in `dtype`: tried
    once per (device type, dtype) on a tiny problem, the answer logged and kept."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_RUNS:
        ok, why = hasattr(torch, "_grouped_mm"), "torch has no _grouped_mm"
        if ok:
            try:
                with torch.enable_grad():
                    x = torch.ones(8, 8, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
                    torch._grouped_mm(x, w, offs=offs).mul(2).sum().backward()
            except (RuntimeError, NotImplementedError) as e:
                ok, why = False, str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        _GROUPED_MM_RUNS[key] = ok
        if ok:
            log.info("moe: experts as grouped matmuls (torch._grouped_mm) on %s %s", *key)
        else:
            log.info("moe: experts as one matmul each on %s %s (%s)", device.type, dtype, why)
    return _GROUPED_MM_RUNS[key]


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight split over the expert-parallel ranks."""
    return w.to_local() if isinstance(w, DTensor) else w


class GroupedExperts(nn.Module):
    """`experts` SwiGLUs with their weights stacked: w1 (gate) and w3 (up) (E, d, h), w2
    (down) (E, h, d), so a row x of expert e computes (silu(x w1[e]) * x w3[e]) w2[e]."""

    def __init__(self, experts: int, d_model: int, hidden: int, mode: str = "auto") -> None:
        super().__init__()
        self.mode = mode
        self.w1 = nn.Parameter(torch.empty(experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, d_model))

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, host_counts: list[int] | None = None
    ) -> torch.Tensor:
        """x (M, d): rows sorted by expert, counts[e] of them for (local) expert e -> (M, d).
        `host_counts`: the same counts where the host knows them (a forced routing)."""
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w1.dtype
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
        if self.use_grouped(x):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        out, start = [], 0
        for e, n in enumerate(counts.tolist() if host_counts is None else host_counts):
            rows = x[start : start + n]
            out.append((F.silu(rows @ w1[e]) * (rows @ w3[e])) @ w2[e])
            start += n
        return torch.cat(out) if out else x.new_zeros(0, w2.shape[-1])

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.mode != "auto":
            return self.mode == "grouped"
        align = 16 // x.element_size()  # grouped_mm wants 16-byte aligned rows
        d, h = self.w1.shape[1], self.w1.shape[2]
        return d % align == 0 and h % align == 0 and grouped_mm_runs(x.device, x.dtype)


class Router(nn.Module):
    """Scores of the experts for each token and the top_k it goes to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.top_k, self.score, self.norm_topk, self.scale = (
            m.top_k, m.score, m.norm_topk, m.routed_scale
        )  # fmt: skip
        self.weight = nn.Parameter(torch.empty(m.experts, cfg.d_model))
        # Added to the scores to choose the experts, never to weight them (balance bias).
        self.register_buffer("expert_bias", torch.zeros(m.experts, dtype=torch.float32))
        # Set by the planner: route token i to experts (i * top_k + j) % E, a balanced load
        # known on the host, instead of by its scores (fake tensors have no values).
        self.balanced = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> (weights (N, k) fp32, experts (N, k) int64, logits (N, E) fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        if self.balanced:
            n, e = x.shape[0], self.weight.shape[0]
            picks = torch.arange(n * self.top_k, device=x.device).view(n, self.top_k) % e
        else:
            picks = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, picks)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.scale, picks, logits

    def balanced_counts(self, copies: int) -> list[int]:
        """Token copies per expert under the forced balanced routing (copy c to c % E)."""
        e = self.weight.shape[0]
        return [copies // e + (i < copies % e) for i in range(e)]


class MoE(nn.Module):
    """The mixture-of-experts MLP of a block: (B, T, d) -> (B, T, d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.experts_n, self.top_k, self.balance = m.experts, m.top_k, m.balance
        self.aux_coef = m.aux_loss_coef if m.balance in ("aux", "both") else 0.0
        self.z_coef, self.bias_rate = m.z_loss_coef, m.bias_update_rate
        self.router = Router(cfg)
        self.experts = GroupedExperts(m.experts, cfg.d_model, cfg.expert_hidden, m.grouped_mm)
        self.shared = (
            SwiGLU(cfg, hidden=m.shared_experts * cfg.expert_hidden) if m.shared_experts else None
        )
        self.shared_gate = (
            nn.Linear(cfg.d_model, 1, bias=False) if m.shared_experts and m.shared_gate else None
        )
        # Expert parallelism's exchange (expert_parallel.py): (experts, rows sorted by expert,
        # counts (E,), the counts as host ints or None) -> the experts' outputs, same order.
        self.expert_runner: Callable | None = None
        # What the last forward saw, for the model to collect: token copies per expert (E,),
        # the unweighted aux and z losses, and the weighted sum of both (with its graph).
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.aux_loss: torch.Tensor | None = None

    @property
    def out_projs(self) -> list[nn.Module]:
        """The modules whose output is written into the residual stream (initialised
        smaller; of the routed experts, their w2)."""
        return [self.experts] + ([self.shared.w2] if self.shared is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        weights, picks, logits = self.router(x)  # (N, k), (N, k), (N, E)
        flat = picks.flatten()  # (N * k,) copy c is token c // k's j-th pick
        order = flat.argsort(stable=True)  # copies sorted by expert
        host = self.router.balanced_counts(flat.numel()) if self.router.balanced else None
        if host is None:
            counts = torch.bincount(flat, minlength=self.experts_n)  # (E,)
        else:  # forced routing: the host knows them (and fake tensors have no values)
            counts = torch.tensor(host, device=x.device)
        rows = x[order // self.top_k]  # (N * k, d)
        if self.expert_runner is None:
            out = self.experts(rows, counts, host)
        else:
            out = self.expert_runner(self.experts, rows, counts, host)
        # Back to token order, weighted and summed over each token's picks (a gather and a
        # sum, not an index_add: the same sums in the same order on every device).
        copies = torch.empty_like(out).index_copy_(0, order, out)
        y = (copies.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1).to(out.dtype)).sum(1)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = s * torch.sigmoid(self.shared_gate(x))
            y = y + s
        self._losses(logits, counts)
        return y.view(shape)

    def _losses(self, logits: torch.Tensor, counts: torch.Tensor) -> None:
        """The balance and z losses of this forward's routing (see the module docstring)."""
        probs = logits.softmax(-1) if self.router.score == "softmax" else logits.sigmoid()
        probs = probs / probs.sum(-1, keepdim=True)
        share = counts.float() / counts.sum().clamp(min=1)
        aux = self.experts_n * (share * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        self.last = (counts.detach().float(), aux.detach(), z.detach())
        weighted = None
        if self.aux_coef:
            weighted = self.aux_coef * aux
        if self.z_coef:
            weighted = self.z_coef * z if weighted is None else weighted + self.z_coef * z
        self.aux_loss = weighted

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Move the bias towards balance from `counts` (E,), the step's token copies per
        expert over every data-parallel rank: the same on all ranks, so all route alike."""
        if self.balance in ("bias", "both"):
            self.router.expert_bias.add_(self.bias_rate * torch.sign(counts.mean() - counts))


class MoEStep:
    """A training step's routing statistics, summed over its micro-batches by the model."""

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []  # per MoE layer (E,)
        self.aux: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []
        self.micro_batches = 0

    def add(self, layers: list[MoE]) -> None:
        seen = [m.last for m in layers]
        if self.micro_batches == 0:
            self.counts, self.aux, self.z = (list(t) for t in zip(*seen, strict=True))
        else:
            for i, (c, a, z) in enumerate(seen):
                self.counts[i] = self.counts[i] + c
                self.aux[i] = self.aux[i] + a
                self.z[i] = self.z[i] + z
        self.micro_batches += 1


def balance_step(
    layers: list[MoE], step: MoEStep, reduce_sum: Callable[[torch.Tensor], torch.Tensor], ranks: int
) -> torch.Tensor:
    """After an optimizer step: sum the step's routing over the `ranks` data-parallel ranks
    (`reduce_sum`, one all-reduce), move each layer's bias, and return the step's statistics
    per MoE layer, (L, 4) on the device: load imbalance (max / mean token copies per expert),
    the aux and z losses (means over micro-batches and ranks) and the bias range (max - min)."""
    n = step.micro_batches * ranks
    losses = torch.stack([torch.stack(step.aux), torch.stack(step.z)], 1)  # (L, 2)
    local = torch.cat([torch.stack(step.counts), losses], 1)
    total = reduce_sum(local)  # (L, E + 2)
    counts, losses = total[:, :-2], total[:, -2:] / n
    for layer, c in zip(layers, counts, strict=True):
        layer.update_bias(c)
    bias = torch.stack([m.router.expert_bias for m in layers])
    imbalance = counts.amax(1) / counts.mean(1).clamp(min=1e-9)
    return torch.stack([imbalance, losses[:, 0], losses[:, 1], bias.amax(1) - bias.amin(1)], 1)
