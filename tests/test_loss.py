"""Chunked output projection + cross-entropy (`Transformer.forward(tokens, targets)`).

Losses and gradients equal the plain fp32 computation the trainer used before, for chunk
sizes that do and do not divide B*T, tied and untied embeddings, fp32 and bf16 autocast;
and what backward keeps (saved-tensor hooks) and the peak memory during loss + backward
(torch's MemTracker, which follows every tensor's storage on the CPU) stay far below one
B*T*V fp32 copy of the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(TINY, init_std=0.1, **overrides))


def batch(
    B: int = 3, T: int = 13, vocab: int = TINY.vocab_size
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What Trainer.loss computed before: the whole (B, T, V) logits in fp32."""
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())


def loss_and_grads(model: Transformer, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [0, 5, 16, 39, 1000])  # B*T = 39
def test_chunked_loss_and_grads_equal_the_fp32_reference(tie: bool, chunk: int) -> None:
    model = build(tie_embeddings=tie)
    inputs, targets = batch()
    ref_loss, ref_grads = loss_and_grads(model, lambda: reference_loss(model, inputs, targets))
    loss, grads = loss_and_grads(model, lambda: model(inputs, targets, loss_chunk_tokens=chunk))
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # evaluation: no checkpointing, the same value
        torch.testing.assert_close(model(inputs, targets, loss_chunk_tokens=chunk), ref_loss)


def test_chunked_loss_in_bf16_autocast() -> None:
    model = build(tie_embeddings=False)
    inputs, targets = batch(B=2, T=16)

    def under_bf16(compute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compute()

    ref_loss, ref_grads = loss_and_grads(
        model, lambda: under_bf16(lambda: reference_loss(model, inputs, targets))
    )
    loss, grads = loss_and_grads(
        model, lambda: under_bf16(lambda: model(inputs, targets, loss_chunk_tokens=5))
    )
    fp32_loss, _ = loss_and_grads(model, lambda: reference_loss(model, inputs, targets))
    # The same bf16 logits, only upcast and reduced per chunk: close to the bf16 reference,
    # and both within bf16 rounding of fp32.
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, fp32_loss, atol=2e-2, rtol=2e-2)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=2e-3, rtol=2e-2, msg=name)


def test_targets_must_match_tokens() -> None:
    inputs, targets = batch()
    with pytest.raises(ValueError, match="targets"):
        build()(inputs, targets[:, :-1])


def test_scores_call_the_head_as_often_as_planned_with_the_same_values() -> None:
    """`planned_tokens` (the most any rank scores in the forward) adds projections of no
    tokens: the same number of them on every rank, and the same scores as without it."""
    model = build().eval()
    inputs, targets = batch()
    targets = torch.where(torch.arange(13) >= 9, targets, -1)  # 3 rows x 4 scored tokens
    calls, project = [], model.lm_head.logits
    model.lm_head.logits = lambda h: (calls.append(h.shape[0]), project(h))[1]
    with torch.no_grad():
        own = model(inputs, targets, loss_chunk_tokens=5, scores=True)
        assert calls == [5, 5, 2]  # 12 scored tokens, 5 at a time
        calls.clear()
        planned = model(inputs, targets, loss_chunk_tokens=5, scores=True, planned_tokens=23)
        assert calls == [5, 5, 2, 0, 0]  # as many calls as 23 tokens need
        calls.clear()
        whole = model(inputs, targets, scores=True, planned_tokens=23)
        assert calls == [12]  # unchunked: one call whatever is planned
    assert torch.equal(planned, own) and own.shape == (12, 2)
    assert torch.allclose(whole, own)


# ------------------------------------------------------------------ memory
B, T, V = 4, 256, 4096  # one fp32 copy of the logits: B*T*V*4 bytes = 16 MiB
LOGITS_FP32 = B * T * V * 4


def memory_model() -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    model = build(vocab_size=V, max_seq_len=T, n_layers=1, tie_embeddings=False)
    return model, *batch(B, T, V)


def saved_by_backward(model, inputs, targets, chunk: int) -> list[int]:
    """Bytes of each tensor autograd saves for backward."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs, targets, loss_chunk_tokens=chunk)
    loss.backward()
    return sizes


def peak_during_loss_and_backward(model, inputs, targets, chunk: int) -> int:
    """Peak bytes of activations and temporaries (not parameters or their gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(inputs, targets, loss_chunk_tokens=chunk).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak[_MemRefType.ACT] + peak[_MemRefType.TEMP]


def test_backward_keeps_no_logits_when_chunked() -> None:
    model, inputs, targets = memory_model()
    whole = saved_by_backward(model, inputs, targets, chunk=0)
    assert max(whole) >= LOGITS_FP32  # the unchunked loss keeps fp32 log-probs of every token
    chunked = saved_by_backward(model, inputs, targets, chunk=128)
    # Not even one chunk's logits (128 x V fp32) is kept: only the model's activations.
    assert max(chunked) < 128 * V * 4 and sum(chunked) < LOGITS_FP32 / 2
    assert sum(whole) - sum(chunked) >= LOGITS_FP32


def test_peak_memory_holds_one_chunk_of_logits() -> None:
    model, inputs, targets = memory_model()
    whole = peak_during_loss_and_backward(model, inputs, targets, chunk=0)
    chunked = peak_during_loss_and_backward(model, inputs, targets, chunk=128)
    # Unchunked: logits, log-probs and the gradient of the logits exist at once (>= 3 fp32
    # copies: 54 MB here). Chunked: the model's activations plus a few 128-token chunks of V
    # fp32 (2 MiB each): under one copy (11 MB here).
    assert whole >= 3 * LOGITS_FP32, whole
    assert chunked < LOGITS_FP32, (whole, chunked)
