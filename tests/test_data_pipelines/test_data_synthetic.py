"""Synthetic generator: reproducibility, the GARCH recursion vs a plain loop, truth vs sample moments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_pipelines.features import range_variances
from data_pipelines.quality import check_and_clean
from data_pipelines.synthetic import DEFAULT_REGIMES, RegimeParams, simulate


def test_reproducible_and_seed_sensitive() -> None:
    a, b, c = simulate(500, seed=3), simulate(500, seed=3), simulate(500, seed=4)
    pd.testing.assert_frame_equal(a.bars, b.bars)
    pd.testing.assert_series_equal(a.true_variance, b.true_variance)
    assert a.bars.attrs["content_hash"] == b.bars.attrs["content_hash"] != c.bars.attrs["content_hash"]
    assert not np.allclose(a.returns, c.returns)


def test_canonical_and_clean() -> None:
    p = simulate(2000, seed=1)
    bars = p.bars
    assert list(bars.columns) == ["open", "high", "low", "close", "volume"]
    assert bars.index.name == "time" and str(bars.index.tz) == "UTC"
    assert bars.attrs["bar"] == "1D" and bars.attrs["bars_per_year"] == 365
    np.testing.assert_allclose(np.log(bars["close"]).diff().iloc[1:], p.returns.iloc[1:], atol=1e-12)
    assert np.log(bars["close"].iloc[0] / 100.0) == pytest.approx(p.returns.iloc[0])
    raw = bars.reset_index()
    raw.attrs.update(bars.attrs)
    _, rep = check_and_clean(raw)
    assert rep.problems == 0 and rep.gaps["count"] == 0 and rep.ohlc_inconsistent == 0


def test_garch_recursion_matches_loop() -> None:
    p = simulate(400, seed=9)
    regs = DEFAULT_REGIMES
    s = p.regimes.to_numpy()
    eps = p.returns.to_numpy() - p.jumps.to_numpy()
    h_prev = regs[0].omega / (1 - regs[0].alpha - regs[0].beta)
    e2 = h_prev
    for t in range(400):
        r = regs[s[t]]
        h = r.omega + r.alpha * e2 + r.beta * h_prev
        assert p.true_variance.iloc[t] == pytest.approx(h + r.jump_intensity * r.jump_scale**2, rel=1e-12)
        e2, h_prev = eps[t] ** 2, h


def test_true_variance_matches_sample_moments() -> None:
    p = simulate(60_000, seed=11, intraday_steps=8)
    z2 = p.returns**2 / p.true_variance
    assert z2.mean() == pytest.approx(1.0, abs=0.04)  # E[r²/σ²] = 1 (heavy tails: loose)
    # both regimes visited; stressed share near the stationary 1/6 of the default chain
    assert 0.10 < p.regimes.mean() < 0.24
    calm, stressed = p.true_variance[p.regimes == 0].median(), p.true_variance[p.regimes == 1].median()
    assert stressed > 3 * calm


def test_range_estimators_unbiased_without_jumps() -> None:
    reg = (RegimeParams(omega=2e-5, alpha=0.05, beta=0.90, nu=6.0, jump_intensity=0.0, jump_scale=0.0),)
    p = simulate(30_000, seed=5, regimes=reg, transition=[[1.0]], intraday_steps=24)
    b = p.bars
    est = range_variances(*(b[k].to_numpy() for k in ("open", "high", "low", "close")))
    for name in ("var_pk", "var_gk", "var_rs"):
        assert (est[name] / p.true_variance.to_numpy()).mean() == pytest.approx(1.0, abs=0.03), name


def test_other_bar_scales_variance() -> None:
    p = simulate(20_000, seed=2, bar="1h", intraday_steps=4)
    assert p.bars.attrs["bars_per_year"] == 365 * 24
    assert (p.bars.index[1] - p.bars.index[0]) == pd.Timedelta("1h")
    daily_uncond = DEFAULT_REGIMES[0].unconditional_variance(1.0)
    assert p.true_variance[p.regimes == 0].median() < daily_uncond / 10


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 1}, "n must be >= 2, got 1"),
    ({"intraday_steps": 0}, "intraday_steps must be >= 1"),
    ({"transition": [[0.5, 0.4], [0.1, 0.9]]}, "row-stochastic"),
    ({"bar": "1B"}, "trade 24/7"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(**{"n": 10, **kwargs})


def test_regime_params_validation() -> None:
    with pytest.raises(ValueError, match="alpha \\+ beta < 1"):
        RegimeParams(omega=1e-5, alpha=0.5, beta=0.6, nu=5, jump_intensity=0, jump_scale=0)
    with pytest.raises(ValueError, match="nu .* must be > 2, got 2"):
        RegimeParams(omega=1e-5, alpha=0.05, beta=0.9, nu=2, jump_intensity=0, jump_scale=0)
