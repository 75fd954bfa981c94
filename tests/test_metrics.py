"""The MFU denominator: measured once per machine, kept as the best seen."""

from __future__ import annotations

import json

import torch

from pretrain.metrics import peak_flops


def test_measured_peak_is_cached_per_machine_as_the_best_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path))
    first, source = peak_flops(torch.device("cpu"), "fp32")
    assert source == "measured matmul peak" and first > 1e8
    cache = tmp_path / "peak_flops.json"
    ((key, value),) = json.loads(cache.read_text()).items()
    assert value == first and "|cpu|fp32|" in key
    cache.write_text(json.dumps({key: first * 1000}))  # a better figure seen before
    assert peak_flops(torch.device("cpu"), "fp32")[0] == first * 1000
    cache.write_text(json.dumps({key: 1.0}))  # a figure from a busy machine does not stick
    again = peak_flops(torch.device("cpu"), "fp32")[0]
    assert again > 1e8 and json.loads(cache.read_text())[key] == again
