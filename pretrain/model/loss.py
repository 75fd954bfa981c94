"""Output projection + cross-entropy in chunks of tokens, so B*T*V logits never exist at once.

The plain loss, `F.cross_entropy(lm_head(h).float(), targets)`, holds the logits in the
compute dtype, again in fp32, and keeps the fp32 log-probabilities for backward: with
B*T = 32k tokens and V = 128k that is 16 GiB of fp32 per copy. Here each chunk of
`chunk_tokens` tokens is projected, upcast, and its summed loss taken inside
`torch.utils.checkpoint`, which keeps only the chunk's input for backward and recomputes
its logits there, one chunk at a time: peak logits memory is a few chunk*V fp32 copies
instead of a few B*T*V, for one extra output-projection matmul (2 * d_model * V FLOPs per
token, under 1% of a 7B model's step).

The projection and the loss are one module, `OutputHead` (the model's `lm_head`, whose
weight keeps the name `lm_head.weight`): its forward takes the final norm's output and the
targets and returns the loss (or scores, or logits). A sharded wrapper (FSDP2, ZeRO-3)
gathers its weight once for that one call and once for its backward, however many chunks
the loss is taken in; the chunks' projections inside, and their recomputation in
backward, use the gathered weight.

Under tensor parallelism (parallel/parallelize.py) the head's logits are a DTensor split over the
vocabulary: the loss is taken on the split logits by torch's `loss_parallel` (a max, a sum
of exponentials and the target's logit, each reduced over the tp group: three tiny
all-reduces a chunk instead of gathering chunk x V logits). Its backward needs the same
context: `loss_parallel_backward` is what the strategy runs `loss.backward()` in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import checkpoint


class OutputHead(nn.Module):
    """The output projection (a (vocab, d_model) weight, no bias) with the loss taken on it.

    `forward(h, targets)`: h (N, d_model), targets (N,) int64 -> the mean cross-entropy,
    `chunk_tokens` at a time (`chunked_cross_entropy`); with `scores`, the scored targets'
    log-probabilities and greedy flags (`token_scores`); without targets, the (..., vocab)
    fp32 logits, whole. Under tensor parallelism (parallelize.py) the weight is split over
    the vocabulary (a DTensor, Shard(0)) and `logits` are too, each rank its part.
    """

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d_model) -> logits (..., vocab_size) in h's dtype; split over the
        vocabulary (a DTensor) when the weight is, with h taken as every rank's whole input."""
        w = self.weight
        if isinstance(w, DTensor) and not isinstance(h, DTensor):
            h = DTensor.from_local(h, w.device_mesh, [Replicate()], run_check=False)
        return F.linear(h, w)

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        chunk_tokens: int = 0,
        scores: bool = False,
        planned_tokens: int = 0,
    ) -> torch.Tensor:
        if targets is None:
            return whole(self.logits(h)).float()
        if scores:
            return token_scores(self.logits, h, targets, chunk_tokens, planned_tokens)
        return chunked_cross_entropy(self.logits, h, targets, chunk_tokens)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.cross_entropy of logits upcast to fp32; logits split over the vocabulary (a
    DTensor, tensor parallelism) are reduced without being gathered."""
    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    with loss_parallel():
        loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    # Replicated over the tp group: every rank holds the value. A copy, not the view
    # to_local gives: FSDP2 warns when the model returns a view (scalar: nothing to copy).
    return loss.to_local().clone()


def loss_parallel_backward(model: nn.Module):
    """The context `loss.backward()` runs in: torch's `loss_parallel` when `model`'s head
    is split over the vocabulary (its backward handlers must be active too), else none."""
    head = getattr(model, "lm_head", None)
    if (
        head is not None
        and isinstance(head.weight, DTensor)
        and "tp" in (head.weight.device_mesh.mesh_dim_names or ())
    ):
        return loss_parallel()
    return contextlib.nullcontext()


def whole(logits: torch.Tensor) -> torch.Tensor:
    """Logits with every vocabulary entry on this rank (gathered if split)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


Head = Callable[[torch.Tensor], torch.Tensor]  # h (N, d_model) -> logits (N, vocab)


def _chunk_loss(head: Head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(head(h), targets, reduction="sum")


def chunked_cross_entropy(
    head: Head, h: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean cross-entropy of `head(h)` (logits upcast to fp32) against `targets`.

    h (N, d_model), targets (N,) int64. 0 < chunk_tokens < N: at most that many tokens'
    logits exist at a time, and none are kept for backward; 0 (or >= N): all at once, kept
    for backward (no recompute).
    """
    n = targets.numel()
    if chunk_tokens <= 0 or chunk_tokens >= n:
        # One chunk: recomputing it in backward would cost a matmul and lower no peak (the
        # recomputation holds the same logits, log-probs and gradient at once).
        return cross_entropy(head(h), targets, reduction="mean")
    total = h.new_zeros((), dtype=torch.float32)
    for h_part, t_part in zip(h.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        if torch.is_grad_enabled():
            # No RNG inside (no dropout after the final norm): skip saving its state.
            part = checkpoint(
                _chunk_loss, head, h_part, t_part, use_reentrant=False, preserve_rng_state=False
            )
        else:
            part = _chunk_loss(head, h_part, t_part)
        total = total + part
    return total / n


def token_scores(
    head: Head,
    h: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    planned_tokens: int = 0,
) -> torch.Tensor:
    """(N, 2) float32 for the N positions where `targets` >= 0, in row-major order: the
    log-probability of the target token and 1.0 where it is the argmax (greedy) token.

    Downstream evaluation's scores (`pretrain.evals`): only the scored positions (a
    choice's or continuation's tokens) are projected, at most `chunk_tokens` at a time
    (0: all at once), so a long few-shot context costs no logits at all.

    `head` is called as often as `max(N, planned_tokens)` scored tokens need, the later
    calls on no tokens, so that ranks scoring different batches in one round make as many
    calls as each other (`planned_tokens`: the most any rank scores in this forward) should
    a call be collective (split logits are gathered under tensor parallelism). The chunks
    themselves stay `chunk_tokens` long from the first scored token, so a score does not
    depend on how many ranks there are.
    """
    keep = targets >= 0
    h, targets = h[keep], targets[keep]
    n = max(targets.numel(), planned_tokens, 1)
    size = chunk_tokens if chunk_tokens > 0 else n
    parts = []
    for k in range(-(-n // size)):  # ceil(n / size) calls, whatever this rank's N
        h_part, t_part = h[k * size : (k + 1) * size], targets[k * size : (k + 1) * size]
        logits = whole(head(h_part)).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, t_part[:, None])[:, 0]
        greedy = (logits.argmax(dim=-1) == t_part).float()
        parts.append(torch.stack([logp, greedy], dim=-1))
    return torch.cat(parts)
