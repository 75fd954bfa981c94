"""Learning-rate schedules and weight-decay groups."""

from __future__ import annotations

import itertools
import math

import pytest
from torch import nn

from pretrain.config.schema import OptimConfig, ScheduleConfig
from pretrain.model import ModelConfig, Transformer
from pretrain.train.optim import build_optimizer, lr_at, param_groups


def test_warmup_is_linear_to_the_peak():
    s = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(i, 1.0, s, 100) for i in range(10)] == pytest.approx(
        [(i + 1) / 10 for i in range(10)]
    )
    assert lr_at(10, 1.0, s, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_reaches_min_lr_at_the_end_and_stays(name):
    s = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(100, 2.0, s, 100) == pytest.approx(0.2)
    assert lr_at(150, 2.0, s, 100) == pytest.approx(0.2)
    lrs = [lr_at(i, 2.0, s, 100) for i in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_cosine_and_linear_midpoints():
    cos = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 1.0, cos, 100) == pytest.approx(0.5)
    assert lr_at(25, 1.0, cos, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(25, 1.0, lin, 100) == pytest.approx(0.75)


def test_decay_steps_overrides_max_steps():
    s = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0, decay_steps=50)
    assert lr_at(25, 1.0, s, 1000) == pytest.approx(0.5)


def test_constant_after_warmup():
    s = ScheduleConfig(name="constant", warmup_steps=4)
    assert lr_at(3, 1.0, s, 10) == 1.0 and lr_at(9, 1.0, s, 10) == 1.0


def _groups(cfg: OptimConfig, **model_kw):
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, **model_kw)
    )
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in param_groups(model, cfg)], model


def test_no_decay_on_norms_biases_embeddings_by_default():
    (decay, no_decay), model = _groups(
        OptimConfig(), bias=True, position="learned", tie_embeddings=False
    )
    assert all(n.endswith("weight") for n in decay)
    assert "tok_emb.weight" in no_decay and "pos_emb.weight" in no_decay
    assert "lm_head.weight" in decay
    assert all(not n.endswith("bias") for n in decay)
    norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(f"{n}.weight" in no_decay for n in norms)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_decay_everything_when_asked():
    groups, model = _groups(OptimConfig(decay_norms_and_biases=True, decay_embeddings=True))
    assert len(groups) == 1 and len(groups[0]) == len(list(model.parameters()))


def test_optimizer_uses_the_groups_and_lr():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
