"""Generation with a KV cache: every cached step's logits equal a full forward's, for each
position encoding, GQA and the sliding window; generation runs the model's own attention;
sampling filters do what they say."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.config import ModelConfig
from pretrain.model.transformer import Transformer
from pretrain.tools.generate import generate, sample

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
VARIANTS = {
    "rope-gqa": dict(n_kv_heads=2),
    "rope-mqa-scaled": dict(n_kv_heads=1, rope_scale=2.0),
    "alibi": dict(position="alibi"),
    "learned-gelu-layernorm": dict(position="learned", mlp="gelu", norm="layernorm", bias=True),
    "sliding-window": dict(n_kv_heads=2, sliding_window=5),
}


def model_of(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**SMALL, **kwargs)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_a_full_forward(variant):
    model = model_of(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    model.set_kv_cache(batch_size=2, max_len=24)
    chunks = [tokens[:, :10]] + [tokens[:, i : i + 1] for i in range(10, 21)] + [tokens[:, 21:]]
    starts = [0, *range(10, 22)]
    with torch.no_grad():
        steps = [model(chunk, start_pos=start) for chunk, start in zip(chunks, starts, strict=True)]
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    cache = model.layers["0"].attn.kv_cache  # layer 0's: k is (B, K, max_len, D)
    assert cache.length == 24 and cache.k.shape == (2, model.cfg.kv_heads, 24, 8)


def test_generation_runs_the_models_own_attention_forward():
    model = model_of(**VARIANTS["sliding-window"])
    calls = []  # (tokens, start_pos, cache set) of every Attention.forward call

    def record(module, args, output):
        calls.append((args[0].shape[1], args[2], module.kv_cache is not None))

    hooks = [layer.attn.register_forward_hook(record) for layer in model.layers.values()]
    try:
        new = generate(model, [5, 17, 3, 44], max_new_tokens=6, temperature=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(new) == 6
    # The prompt in one call, then each fed-back token at its position, in every layer.
    feeds = [(4, 0)] + [(1, 4 + i) for i in range(5)]
    assert calls == [(n, start, True) for n, start in feeds for _ in model.layers]
    assert model.kv_caches() == []  # generate leaves the model as training uses it


@pytest.mark.parametrize("variant", ["rope-gqa", "alibi"])
def test_greedy_generation_equals_recomputing_everything(variant):
    model = model_of(**VARIANTS[variant])
    prompt = [5, 17, 3, 44]
    new = generate(model, prompt, max_new_tokens=12, temperature=0)
    expected, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
            expected.append(token)
            seq.append(token)
    assert new == expected


def test_generation_stops_at_eos_and_at_the_context_length():
    model = model_of()
    greedy = generate(model, [1, 2, 3], max_new_tokens=10, temperature=0)
    stop = greedy[4]
    first = greedy.index(stop)
    assert generate(model, [1, 2, 3], 10, temperature=0, eos_id=stop) == greedy[: first + 1]
    assert len(generate(model, list(range(28)), 100, temperature=0)) == 32 - 28


# ------------------------------------------------------------------ the model's KV cache
def tokens_of(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_in_chunks(model: Transformer, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Logits of x fed through the model's KV cache in chunks of `sizes` tokens."""
    out, start = [], 0
    with torch.no_grad():
        for size in sizes:
            out.append(model(x[:, start : start + size], start_pos=start))
            start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_with_the_naive_kernel_and_a_full_cache(variant):
    model = model_of(attention="naive", init_std=0.2, **VARIANTS[variant])
    x = tokens_of(T=32)
    with torch.no_grad():
        full = model(x)
    model.set_kv_cache(batch_size=2)  # max_len: the whole context
    cached = decode_in_chunks(model, x, [6, 1, 1, 4, 1, 3, 15, 1])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    model.clear_kv_cache()
    assert model.kv_caches() == []
    with torch.no_grad():
        assert torch.equal(model(x), full)


def test_kv_cache_writes_at_the_given_position():
    # Going back rewrites the cache from there: a second continuation of the same prefix.
    model = model_of(position="alibi", n_kv_heads=2, sliding_window=5)
    x, y = tokens_of(T=12), tokens_of(T=12, seed=2)
    y[:, :7] = x[:, :7]
    model.set_kv_cache(batch_size=2, max_len=12)
    decode_in_chunks(model, x, [12])
    with torch.no_grad():
        tail = model(y[:, 7:], start_pos=7)
        model.clear_kv_cache()
        torch.testing.assert_close(tail, model(y)[:, 7:], rtol=1e-5, atol=1e-5)


def test_kv_cache_is_bounded_and_says_so():
    model = model_of()
    x = tokens_of(T=32)
    model.set_kv_cache(batch_size=2, max_len=8)
    decode_in_chunks(model, x, [7, 1])
    with pytest.raises(ValueError, match=r"positions 8\.\.8 exceed the KV cache's max_len 8"):
        model(x[:, 8:9], start_pos=8)
    with pytest.raises(ValueError, match="max_len 8"):
        model(x[:, :9])  # a fresh prompt longer than the cache
    with pytest.raises(ValueError, match="batch_size 2"):
        model(tokens_of(T=2, B=3))
    assert [cache.length for cache in model.kv_caches()] == [8, 8]  # nothing written
    # A full-size cache takes the whole context; a position past it is refused, not wrapped.
    model.set_kv_cache(batch_size=2)
    decode_in_chunks(model, x, [31, 1])
    with pytest.raises(ValueError, match="max_seq_len 32"):
        model(x[:, :1], start_pos=32)
    with pytest.raises(ValueError, match="max_seq_len 32"):
        model.set_kv_cache(batch_size=1, max_len=33)


def test_start_pos_needs_a_filled_cache():
    model = model_of()
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(tokens_of(T=2), start_pos=3)
    model.set_kv_cache(batch_size=2)
    decode_in_chunks(model, tokens_of(T=4), [4])
    with pytest.raises(ValueError, match=r"holds positions 0\.\.3"):
        model(tokens_of(T=1), start_pos=5)  # position 4 was never written


def test_kv_cache_is_not_state_and_the_training_block_compiles_as_one_graph():
    model = model_of(position="alibi", sliding_window=4).train()
    state, buffers = set(model.state_dict()), {name for name, _ in model.named_buffers()}
    model.set_kv_cache(batch_size=1)
    assert set(model.state_dict()) == state and {n for n, _ in model.named_buffers()} == buffers
    model.clear_kv_cache()
    # fullgraph: no graph break on the cache attribute or the mask; gradients as in eager.
    block, x = model.layers["0"], torch.randn(2, 8, 32, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    grad = torch.autograd.grad(compiled(x).square().sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(block(x).square().sum(), x)[0])


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=0), greedy)
    assert torch.equal(sample(logits, top_k=1, generator=g), greedy)
    assert torch.equal(sample(logits, top_p=1e-6, generator=g), greedy)
    draws = torch.stack([sample(logits, top_k=3, generator=g) for _ in range(300)])
    top3 = logits.topk(3, dim=-1).indices
    for row in range(4):
        assert set(draws[:, row].tolist()) == set(top3[row].tolist())
    # top-p keeps the smallest set whose probability reaches p: here the first two ids
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    draws = {int(sample(probs.log(), top_p=0.75, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    a = [int(sample(logits[:1], generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1  # the same seed, the same draw


@pytest.mark.slow
def test_generate_command_is_reproducible(tiny_overrides, reference, capsys):
    from pretrain.__main__ import main

    run = reference("single", tiny_overrides)
    args = ["generate", str(run), "--prompt", "To be, or", "--max-new-tokens", "12", "--seed", "3"]
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        captured = capsys.readouterr()
        assert "tokens in" in captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("To be, or")
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p 1.5" in capsys.readouterr().err
