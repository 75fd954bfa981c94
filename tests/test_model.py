"""Model numerics: attention kernels vs the naive reference, positions, masks, counts, init;
the masked-GQA SDPA path, the bounded mask cache and the flash-attn/SDPA choice per GPU.

CPU and tiny (fp32, a few bf16 checks); two GPU-only groups (flash_attn numerics, SDPA
never needing its math kernel) are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model import (
    ModelConfig,
    Transformer,
    alibi_slopes,
    apply_rope,
    count_params,
    flash_attn_available,
    flops_per_token,
    rope_cos_sin,
)
from pretrain.model.attention import (
    BIAS_CACHE,
    BiasCache,
    attention_bias,
    sdpa_attention,
    sdpa_native_gqa,
    select_backend,
)

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(TINY, **overrides)).eval()


def tokens(T: int = 16, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "causal": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "window": {"sliding_window": 5},
    "alibi": {"position": "alibi"},
    "alibi_gqa_window": {"position": "alibi", "n_kv_heads": 2, "sliding_window": 4},
    "learned": {"position": "learned"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_matches_naive(variant: str) -> None:
    # init_std 0.2 makes attention far from uniform, so mask or head mix-ups show.
    kw = {**VARIANTS[variant], "init_std": 0.2}
    sdpa, naive = build(attention="sdpa", **kw), build(attention="naive", **kw)
    naive.load_state_dict(sdpa.state_dict())
    x = tokens(T=20)
    torch.testing.assert_close(sdpa(x), naive(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "mqa"])
def test_gqa_shares_kv_heads_like_repeat_interleave(variant: str) -> None:
    # Equivalent MHA: duplicate each kv head's projection rows n_heads/kv_heads times.
    gqa = build(init_std=0.2, attention="sdpa", **VARIANTS[variant])
    mha = build(init_std=0.2, attention="naive")
    H, K, D = TINY.n_heads, gqa.cfg.kv_heads, TINY.head_dim
    state = gqa.state_dict()
    for i in range(TINY.n_layers):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{name}.weight"].view(K, D, -1)
            state[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(H // K, 0).flatten(0, 1)
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper() -> None:
    # Power of two n: 2^(-8i/n), i = 1..n.
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    assert alibi_slopes(16) == pytest.approx([2.0 ** (-i / 2) for i in range(1, 17)])
    # 12 heads: the 8-head slopes, then slopes 1, 3, 5, 7 (1-based) of the 16-head series.
    expected_12 = [2.0**-i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert alibi_slopes(12) == pytest.approx(expected_12)


def test_alibi_bias_is_minus_slope_times_distance() -> None:
    T, H = 6, 4
    bias = attention_bias(H, True, None, T, torch.device("cpu"), torch.float32)[0]
    for h, i, j in itertools.product(range(H), range(T), range(T)):
        want = -(2.0 ** (-8 * (h + 1) / H)) * (i - j) if j <= i else -math.inf
        assert bias[h, i, j].item() == pytest.approx(want)


def test_rope_scores_depend_only_on_relative_offset() -> None:
    D, T = 16, 40
    cos, sin = rope_cos_sin(D, T)
    q, k = torch.randn(2, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rq = apply_rope(q.expand(1, T, 1, D), cos.double(), sin.double())[0, :, 0]  # (T, D)
    rk = apply_rope(k.expand(1, T, 1, D), cos.double(), sin.double())[0, :, 0]

    def score(m: int, n: int) -> float:
        return (rq[m] @ rk[n]).item()

    for m, n, shift in [(5, 2, 7), (3, 3, 20), (0, 9, 30)]:
        assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)  # and it does depend on it


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_positions_passed_in_are_the_ones_encoded(position: str) -> None:
    """The default positions are 0..T-1; positions given by the caller (a context-parallel
    part of a sequence) are encoded instead. RoPE depends only on relative offsets, so a
    constant shift leaves the logits as they are; a learned table does not."""
    model, x = build(position=position, init_std=0.5), tokens(T=8)  # attention that matters
    plain = model(x)
    assert torch.equal(model(x, positions=torch.arange(8)), plain)
    shifted = model(x, positions=torch.arange(8) + 5)
    if position == "rope":
        torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x, positions=torch.arange(8).flip(0)), plain, atol=1e-2)
    else:
        assert not torch.allclose(shifted, plain, atol=1e-2)
    with pytest.raises(ValueError, match=r"positions \(7,\) must be \(8,\)"):
        model(x, positions=torch.arange(7))


def test_rope_scale_interpolates_positions() -> None:
    D, T = 16, 32
    cos1, sin1 = rope_cos_sin(D, T, scale=1.0)
    cos2, sin2 = rope_cos_sin(D, T, scale=2.0)
    torch.testing.assert_close(cos2[0::2], cos1[: T // 2])
    torch.testing.assert_close(sin2[0::2], sin1[: T // 2])
    x = torch.randn(1, 1, 2, D).expand(1, T, 2, D)
    torch.testing.assert_close(
        apply_rope(x, cos2, sin2)[:, 0::2], apply_rope(x, cos1, sin1)[:, :16]
    )


@pytest.mark.parametrize(
    "kw",
    [{}, {"position": "alibi"}, {"position": "learned"}, {"sliding_window": 3}],
    ids=["rope", "alibi", "learned", "window"],
)
def test_future_tokens_never_change_earlier_logits(kw: dict) -> None:
    model, x = build(**kw), tokens(T=12)
    t = 7
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1) % TINY.vocab_size
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_sliding_window_sees_exactly_the_last_w_tokens(attention: str, position: str) -> None:
    # One layer: output t depends on token j iff t - w + 1 <= j <= t.
    T, w = 10, 3
    model = build(n_layers=1, sliding_window=w, attention=attention, position=position)
    x = tokens(T=T, B=1)
    base = model(x)[0]
    depends = torch.zeros(T, T, dtype=torch.bool)  # (t, j)
    for j in range(T):
        changed = x.clone()
        changed[0, j] = (x[0, j] + 1) % TINY.vocab_size
        depends[:, j] = (model(changed)[0] - base).abs().amax(-1) > 0
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(depends, (j <= t) & (j > t - w))


def grid_configs() -> list[ModelConfig]:
    axes = itertools.product(
        [True, False], ["rope", "learned"], ["swiglu", "gelu"], ["rmsnorm", "layernorm"],
        [False, True], [None, 2, 1],
    )  # fmt: skip
    return [
        dataclasses.replace(
            TINY, tie_embeddings=tie, position=pos, mlp=mlp, norm=norm, bias=bias, n_kv_heads=kv
        )
        for tie, pos, mlp, norm, bias, kv in axes
    ] + [dataclasses.replace(TINY, mlp_hidden=72, d_model=48, n_heads=6, n_kv_heads=3)]


@pytest.mark.parametrize("cfg", grid_configs())
def test_count_params_matches_the_built_model(cfg: ModelConfig) -> None:
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    emb = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    non_emb = sum(p.numel() for p in model.parameters() if id(p) not in emb)
    assert count_params(cfg, include_embeddings=False) == non_emb


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "position": "learned", "bias": True}])
def test_meta_build_then_init_equals_normal_build(kw: dict) -> None:
    cfg = dataclasses.replace(TINY, norm="layernorm", **kw)
    torch.manual_seed(3)
    eager = Transformer(cfg)
    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert (lazy.lm_head.weight is lazy.tok_emb.weight) == cfg.tie_embeddings
    a, b = dict(eager.named_parameters()), dict(lazy.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    for (name, x), (_, y) in zip(eager.named_buffers(), lazy.named_buffers(), strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, bias=True)
    model = Transformer(cfg)
    block = model.layers["0"]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.w2.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.all(block.attn.v_proj.bias == 0) and torch.all(block.attn_norm.weight == 1)


def test_flops_per_token_by_hand() -> None:
    cfg = ModelConfig(
        vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=160
    )
    # head_dim 16. Per layer: qkv 64 x (4 + 2 + 2) * 16 = 8192, out 64 x 64 = 4096,
    # SwiGLU 3 x 64 x 160 = 30720 -> 43008. Two layers + lm_head 100 x 64: 92416 weights.
    dense = 6 * 92416
    attention = 12 * 2 * 64 * 32  # layers x d_model x seq_len
    assert flops_per_token(cfg, seq_len=32) == dense + attention == 603648
    windowed = dataclasses.replace(cfg, sliding_window=8)
    assert flops_per_token(windowed, seq_len=32) == dense + 12 * 2 * 64 * 8


def test_mask_cached_under_inference_mode_still_trains() -> None:
    BIAS_CACHE.clear()
    model = build(sliding_window=4).train()
    with torch.inference_mode():
        model(tokens())
    model(tokens()).sum().backward()
    assert model.layers["0"].attn.k_proj.weight.grad is not None


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_dropout_is_active_in_train_mode_only(attention: str) -> None:
    model, x = build(dropout=0.5, attention=attention, sliding_window=6), tokens()
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    out = model(x)
    out.sum().backward()
    assert not torch.allclose(out, model(x))


def test_too_long_sequence_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        build()(tokens(T=TINY.max_seq_len + 1))


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed here")
def test_flash_without_flash_attn_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="flash_attn"):
        build(attention="flash")


def test_bf16_autocast_close_to_fp32() -> None:
    model = build(n_layers=1, init_std=0.1)
    x = tokens(T=8, B=1)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and the flash_attn package (the CPU path is SDPA, tested above)",
)
@pytest.mark.parametrize("variant", ["causal", "gqa", "window", "alibi"])
def test_flash_attn_matches_sdpa_in_bf16(variant: str) -> None:
    kw = {**VARIANTS[variant], "d_model": 256, "n_heads": 4, "max_seq_len": 256}
    with torch.device("cuda"):
        flash, sdpa = build(attention="flash", **kw), build(attention="sdpa", **kw)
    sdpa.load_state_dict(flash.state_dict())
    x = tokens(T=256).cuda()
    assert (
        flash.layers["0"].attn.backend(torch.empty(1, device="cuda", dtype=torch.bfloat16))
        == "flash"
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(flash(x), sdpa(x), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ masked GQA, backends
def reference_attention(q, k, v, alibi: bool, window: int | None) -> torch.Tensor:
    """Plain math attention, written out: q (B, H, T, D), k/v (B, K, T, D)."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    if alibi:
        slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
        scores = scores - slopes[:, None, None] * (i - j)
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = scores.masked_fill(~allowed, -math.inf)
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


class SDPACalls(TorchDispatchMode):
    """Records the shapes and mask dtype of every fused attention op SDPA dispatches to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Size, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            mask = kwargs.get("attn_mask")
            self.calls.append((str(func), args[1].shape, None if mask is None else mask.dtype))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "alibi,window", [(False, 5), (True, None), (True, 7)], ids=["window", "alibi", "alibi_window"]
)
def test_masked_gqa_sdpa_expands_kv_and_matches_math(alibi, window, dtype) -> None:
    B, H, K, T, D = 2, 8, 2, 37, 16  # T not a multiple of the mask alignment
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=g).to(dtype) for n in (H, K, K))
    q.requires_grad_()
    mask = attention_bias(H, alibi, window, T, q.device, dtype)
    assert mask.dtype == dtype and mask.shape == (1, H if alibi else 1, T, T)
    with SDPACalls() as seen:
        out = sdpa_attention(q, k, v, mask, causal=True)
    # The kernel got k/v with all H heads (no enable_gqa) and a mask in the query dtype:
    # what SDPA's memory-efficient CUDA kernel needs instead of the math fallback.
    assert seen.calls and all(shape[1] == H and m == dtype for _, shape, m in seen.calls)
    ref = reference_attention(q, k, v, alibi, window)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    grad = torch.autograd.grad(out.float().square().sum(), q)[0]
    qr = q.detach().double().requires_grad_()
    ref_grad = torch.autograd.grad(reference_attention(qr, k, v, alibi, window).square().sum(), qr)[
        0
    ]
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("autocast", [False, True])
def test_model_passes_expanded_kv_and_a_query_dtype_mask(autocast: bool) -> None:
    model = build(attention="sdpa", position="alibi", n_kv_heads=2, sliding_window=4)
    dtype = torch.bfloat16 if autocast else torch.float32
    with SDPACalls() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(tokens())
    assert len(seen.calls) == TINY.n_layers
    assert all(shape[1] == TINY.n_heads and m == dtype for _, shape, m in seen.calls)


def test_unmasked_gqa_keeps_grouped_kv_on_cpu() -> None:
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with SDPACalls() as seen:
        sdpa_attention(q, k, k, None, causal=True)
    assert [shape[1] for _, shape, _ in seen.calls] == [2]  # enable_gqa, no copy


def test_mask_cache_stays_bounded_over_many_lengths() -> None:
    BIAS_CACHE.clear()
    model = build(position="alibi", n_kv_heads=2, sliding_window=6, attention="sdpa")
    for T in range(1, TINY.max_seq_len + 1):
        model(tokens(T=T, B=1))
        assert len(BIAS_CACHE) <= BIAS_CACHE.max_entries
    newest = next(reversed(BIAS_CACHE.entries.values()))
    assert newest.shape[-1] == TINY.max_seq_len
    # The byte budget too (16 KiB): masks of 1, 4, 16 and 9 KiB leave only the newest.
    small = BiasCache(max_entries=8, max_bytes=16 << 10)
    kept = []
    for T in (8, 16, 32, 24):
        small.get(("k", T), lambda T=T: torch.zeros(1, 4, T, T))
        kept.append(list(small.entries))
    assert kept == [[("k", 8)], [("k", 8), ("k", 16)], [("k", 32)], [("k", 24)]]


@pytest.mark.parametrize(
    "impl,capability,dtype,head_dim,dropout,importable,expected",
    [
        ("auto", (9, 0), torch.bfloat16, 128, 0.0, True, "flash"),  # H100
        ("auto", (8, 0), torch.float16, 64, 0.0, True, "flash"),  # A100
        ("flash", (8, 9), torch.bfloat16, 128, 0.1, True, "flash"),  # L40S
        ("auto", (7, 0), torch.float16, 128, 0.0, True, "sdpa"),  # V100: no flash-attn 2
        ("flash", (7, 5), torch.float16, 64, 0.0, True, "sdpa"),  # T4
        ("auto", (9, 0), torch.float32, 128, 0.0, True, "sdpa"),  # fp32: no flash
        ("auto", None, torch.bfloat16, 128, 0.0, True, "sdpa"),  # CPU
        ("auto", (9, 0), torch.bfloat16, 128, 0.0, False, "sdpa"),  # not installed
        ("auto", (9, 0), torch.bfloat16, 512, 0.0, True, "sdpa"),  # head_dim too large
        ("auto", (8, 6), torch.bfloat16, 208, 0.0, True, "sdpa"),  # its backward: sm80/90 only
        ("auto", (9, 0), torch.bfloat16, 208, 0.0, True, "flash"),
        ("auto", (8, 6), torch.bfloat16, 256, 0.1, True, "sdpa"),
        ("auto", (8, 6), torch.bfloat16, 256, 0.0, True, "flash"),
        ("sdpa", (9, 0), torch.bfloat16, 128, 0.0, True, "sdpa"),
        ("naive", (9, 0), torch.bfloat16, 128, 0.0, True, "naive"),
    ],
)
def test_select_backend(impl, capability, dtype, head_dim, dropout, importable, expected) -> None:
    got = select_backend(impl, capability, dtype, head_dim, dropout, flash_importable=importable)
    assert got == expected


def test_sdpa_native_gqa_only_where_a_fused_kernel_takes_it() -> None:
    assert sdpa_native_gqa("cpu", None, torch.float32, 64)
    assert sdpa_native_gqa("cuda", (9, 0), torch.bfloat16, 128)
    assert not sdpa_native_gqa("cuda", (9, 0), torch.float32, 128)  # fp32: efficient kernel
    assert not sdpa_native_gqa("cuda", (7, 0), torch.float16, 128)  # no SDPA flash on V100
    assert not sdpa_native_gqa("cuda", (9, 0), torch.bfloat16, 512)


def test_cpu_tensors_never_pick_flash() -> None:
    attn = build(attention="auto").layers["0"].attn
    assert attn.backend(torch.empty(1, dtype=torch.bfloat16)) == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["window", "alibi", "alibi_gqa_window", "gqa"])
def test_gpu_sdpa_never_needs_the_math_kernel(variant: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kw = {"n_kv_heads": 2, **VARIANTS[variant], "d_model": 256, "n_heads": 4, "max_seq_len": 256}
    with torch.device("cuda"):
        model = build(attention="sdpa", **kw).train()
    x = tokens(T=256).cuda()
    capability = torch.cuda.get_device_capability()
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
    # Math disabled: SDPA raises if a call could only run there (GQA + mask before the fix).
    with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
        if capability >= (8, 0):
            model(x).float().square().mean().backward()
    expect = "flash" if flash_attn_available() and capability >= (8, 0) else "sdpa"
    auto = build(attention="auto", **kw).layers["0"].attn
    assert auto.backend(torch.empty(1, device="cuda", dtype=torch.bfloat16)) == expect
