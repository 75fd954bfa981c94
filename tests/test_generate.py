"""Generation with a KV cache: every cached step's logits equal a full forward's, for each
position encoding, GQA and the sliding window; sampling filters do what they say."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.config import ModelConfig
from pretrain.model.transformer import Transformer
from pretrain.tools.generate import KVCache, forward_cached, generate, sample

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
    cache = KVCache(model.cfg.n_layers)
    chunks = [tokens[:, :10]] + [tokens[:, i : i + 1] for i in range(10, 21)] + [tokens[:, 21:]]
    cached = torch.cat([forward_cached(model, chunk, cache) for chunk in chunks], dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert cache.length == 24 and cache.k[0].shape == (2, model.cfg.kv_heads, 24, 8)


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
