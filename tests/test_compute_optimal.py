"""`pretrain plan` against the numbers published in Hoffmann et al. (2022), the Chinchilla paper."""

from __future__ import annotations

import shutil

import pytest

from pretrain.errors import ConfigError
from pretrain.tools.compute_optimal import (
    CHINCHILLA,
    CHINCHILLA_PRINTED,
    PEAK_FLOPS,
    ShippedConfig,
    budget_flops,
    fmt_count,
    fmt_duration,
    fmt_flops,
    main,
    nearest_config,
    peak_flops,
    read_configs,
    tokens_rule_optimal,
)
from tests.helpers.runs import REPO

GOPHER_FLOPS = 5.76e23

# Table 3 of the paper (Approach 1): parameters -> training FLOPs, training tokens.
TABLE_3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize(("n", "flops", "d"), TABLE_3)
def test_table_3_rows_satisfy_6nd(n, flops, d):
    # A check on the transcription: the paper's rows obey C = 6 N D to within 5%.
    assert rel(6 * n * d, flops) < 0.05


@pytest.mark.parametrize(("n", "flops", "d"), TABLE_3)
def test_20_tokens_rule_reproduces_table_3(n, flops, d):
    # Approach 1 lands at 20-22 tokens per parameter, so the rule is within 10% on N and D.
    n_rule, d_rule = tokens_rule_optimal(flops)
    assert rel(n_rule, n) < 0.10
    assert rel(d_rule, d) < 0.10
    assert d_rule == pytest.approx(20 * n_rule)
    assert 6 * n_rule * d_rule == pytest.approx(flops, rel=1e-12)


def test_approach_3_exponents_match_table_2():
    a, b = CHINCHILLA.exponents
    assert (round(a, 2), round(b, 2)) == (0.46, 0.54)
    assert a + b == pytest.approx(1.0)


def test_unrounded_constants_round_to_the_printed_ones():
    for field in ("E", "A", "B", "alpha", "beta"):
        printed = getattr(CHINCHILLA_PRINTED, field)
        digits = 2 if field in ("E", "alpha", "beta") else 1
        assert round(getattr(CHINCHILLA, field), digits) == printed, field


def test_approach_3_gives_about_40b_for_gophers_budget():
    # Section 3.3: the parametric fit puts the optimum for Gopher's budget at about 40B.
    n, d = CHINCHILLA.optimal(GOPHER_FLOPS)
    assert rel(n, 40e9) < 0.05
    assert 6 * n * d == pytest.approx(GOPHER_FLOPS, rel=1e-12)


def test_printed_rounded_constants_understate_the_optimum():
    # Why CHINCHILLA keeps the TeX-source precision (Besiroglu et al. 2024): the exponents
    # printed to two decimals give a = 0.45 and about 32B instead of the paper's 40B.
    a, _ = CHINCHILLA_PRINTED.exponents
    n, _ = CHINCHILLA_PRINTED.optimal(GOPHER_FLOPS)
    assert round(a, 2) == 0.45
    assert 30e9 < n < 34e9


@pytest.mark.parametrize("flops", [1e18, 1.21e20, GOPHER_FLOPS, 1.3e28])
def test_approach_3_optimum_is_on_budget_and_minimal(flops):
    n, d = CHINCHILLA.optimal(flops)
    assert 6 * n * d == pytest.approx(flops, rel=1e-12)
    best = CHINCHILLA.loss(n, d)
    for f in (0.9, 0.99, 1.01, 1.1):  # other points on the same iso-FLOP line are worse
        assert CHINCHILLA.loss(n * f, d / f) > best


def test_approach_3_prefers_chinchilla_to_gopher():
    # The paper's headline: at about Gopher's budget, Chinchilla (70B params, 1.4T tokens)
    # beats Gopher (280B, 300B tokens); the fitted law agrees, and both lie above E.
    chinchilla, gopher = CHINCHILLA.loss(70e9, 1.4e12), CHINCHILLA.loss(280e9, 300e9)
    assert CHINCHILLA.E < chinchilla < gopher


def test_budget_and_peak_flops():
    assert budget_flops(64, 72, 989e12, 0.4) == pytest.approx(64 * 72 * 3600 * 989e12 * 0.4)
    assert peak_flops("h100") == peak_flops("H100") == 989e12
    assert peak_flops("a100-sxm-80gb") == peak_flops("nvidia_a100-sxm4-40gb") == 312e12
    assert all(v > 1e14 or k in ("V100", "L4") for k, v in PEAK_FLOPS.items())
    with pytest.raises(ConfigError, match=r"TPU9.*known: .*H100"):
        peak_flops("TPU9")


def test_nearest_config_is_nearest_in_log_space():
    small, big = ShippedConfig("small", 100_000_000, 1), ShippedConfig("big", 1_900_000_000, 1)
    # 500M: 5x above small, 3.8x below big, so big, although small is nearer linearly.
    assert nearest_config(500e6, [small, big]) is big
    assert nearest_config(400e6, [small, big]) is small


def test_read_shipped_configs():
    configs = {c.name: c for c in read_configs(REPO / "configs")}
    assert {"125m", "350m", "1.3b", "7b"} <= configs.keys()
    assert configs["1.3b"].tokens_per_step == 512 * 2048
    assert 6e9 < configs["7b"].params < 7e9


def test_formatting():
    assert fmt_flops(1.2345e21) == "1.23e21"
    assert fmt_count(2.8e9) == "2.8B"
    assert fmt_count(57e9) == "57B"
    assert fmt_count(216.2e12) == "216T"
    assert fmt_count(999.7e9) == "1T"
    assert fmt_count(125e6) == "125M"
    assert fmt_duration(3 * 86400 + 4 * 3600 + 59) == "3d 4h"
    assert fmt_duration(5 * 3600 + 12 * 60) == "5h 12m"
    assert fmt_duration(2 * 365 * 86400) == "2.0y"


def test_cli_flops(capsys):
    assert main(["--flops", "5.76e23"]) == 0
    out = capsys.readouterr().out
    assert "5.76e23 FLOPs" in out
    assert fmt_count(CHINCHILLA.optimal(GOPHER_FLOPS)[0]) in out  # approach 3, ~40B
    assert "69.3B" in out and "1.39T" in out  # sqrt(5.76e23 / 120) and 20x that
    assert "nearest config: llama3-70b" in out  # the shipped config nearest to 69B
    assert "attention FLOPs" in out
    for n in (8, 64, 512):
        assert f"{n} x H100" in out


def test_cli_gpus(capsys):
    assert main(["--gpus", "64", "--hours", "72", "--gpu-type", "H100", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    flops = 64 * 72 * 3600 * 989e12 * 0.4
    assert f"{fmt_flops(flops)} FLOPs" in out and "6.56e21" in out
    assert "nearest config: " in out
    names = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    line = next(ln for ln in out.splitlines() if ln.startswith("nearest config: "))
    assert line.split()[2] in names
    assert "tokens/s" in out and "3d 0h (given)" in out


def test_cli_configs_folder(tmp_path, capsys):
    shutil.copy(REPO / "configs" / "125m.yaml", tmp_path / "only.yaml")
    assert main(["--flops", "1e24", "--configs", str(tmp_path)]) == 0
    assert "nearest config: only" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"no \*\.yaml"):
        main(["--flops", "1e24", "--configs", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--gpus", "8", "--hours", "1", "--gpu-type", "tpu9"], "'tpu9'.*known"),
        (["--gpus", "8", "--hours", "-1", "--gpu-type", "H100"], "--hours must be positive"),
        (["--gpus", "0", "--hours", "1", "--gpu-type", "H100"], "--gpus must be positive"),
        (["--flops=-1e21"], "--flops must be positive"),
        (["--flops", "nan"], "--flops must be positive"),
        (["--flops", "1e21", "--mfu", "1.5"], "--mfu"),
        (["--flops", "1e21", "--mfu", "0"], "--mfu"),
        ([], "missing --gpus, --hours, --gpu-type"),
        (["--gpus", "8", "--gpu-type", "H100"], "missing --hours"),
        (["--flops", "1e21", "--gpus", "8", "--hours", "2", "--gpu-type", "H100"], "not both"),
        (["--flops", "1e21", "--gpus", "8"], "--gpus needs --gpu-type"),
    ],
)
def test_cli_bad_input(argv, match):
    with pytest.raises(ConfigError, match=match):
        main(argv)
