"""The VolatilityForecast contract and the registry (models/base.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import FORECASTERS, VolatilityForecast, get_forecaster


def make(n: int = 4, H: int = 3, **kw) -> VolatilityForecast:
    idx = pd.date_range("2024-01-01", periods=n, freq="D", tz="UTC")
    var = (np.arange(n * H, dtype=float).reshape(n, H) + 1) * 1e-4
    return VolatilityForecast(origins=idx, variance=var, model="m", version="v1", **kw)


class TestVolatilityForecast:
    def test_frame_layout_and_cumulative(self):
        fc = make()
        df = fc.to_frame()
        assert list(df.columns) == ["h.1", "h.2", "h.3"] and str(df.index.tz) == "UTC"
        np.testing.assert_allclose(fc.cumulative_variance(2), fc.variance[:, :2].sum(axis=1))
        np.testing.assert_allclose(fc.volatility(), np.sqrt(fc.variance))
        with pytest.raises(ValueError, match=r"steps must be in \[1, 3\], got 4"):
            fc.cumulative_variance(4)

    def test_long_frame_round_trip(self):
        q = np.sort(np.random.default_rng(42).standard_normal((4, 3, 2)), axis=2)
        p = np.tile([0.2, 0.8], (4, 1))
        fc = make(quantiles=q, quantile_levels=(0.05, 0.95), regime_probs=p, regime_names=("calm", "stressed"))
        back = VolatilityForecast.from_long_frame(fc.to_long_frame(), model="m", version="v1")
        np.testing.assert_array_equal(back.variance, fc.variance)
        np.testing.assert_array_equal(back.quantiles, fc.quantiles)
        np.testing.assert_array_equal(back.regime_probs, fc.regime_probs)
        assert back.regime_names == ("calm", "stressed") and back.quantile_levels == (0.05, 0.95)

    def test_stack_and_slice(self):
        a, b = make(2), make(3)
        b = VolatilityForecast(origins=b.origins + pd.Timedelta(days=10), variance=b.variance, model="m")
        s = VolatilityForecast.stack([a, b])
        assert len(s) == 5 and s.horizon == 3
        part = s.slice("2024-01-02", "2024-01-12")
        assert len(part) == 2 and part.origins[0] == pd.Timestamp("2024-01-02", tz="UTC")

    def test_naive_origins_become_utc_and_arrays_are_read_only(self):
        fc = VolatilityForecast(origins=pd.date_range("2024-01-01", periods=2), variance=np.ones((2, 1)), model="m")
        assert str(fc.origins.tz) == "UTC"
        with pytest.raises(ValueError, match="read-only"):
            fc.variance[0, 0] = 2.0

    @pytest.mark.parametrize(
        ("var", "match"),
        [
            (np.array([[1.0, -1.0]]), "variance must be finite and > 0"),
            (np.array([[1.0, np.nan]]), "variance must be finite and > 0"),
            (np.ones((2, 2)), "variance has 2 rows but there are 1 origins"),
        ],
    )
    def test_invalid_variance(self, var, match):
        with pytest.raises(ValueError, match=match):
            VolatilityForecast(origins=pd.DatetimeIndex(["2024-01-01"]), variance=var, model="m")

    def test_quantile_and_regime_validation(self):
        with pytest.raises(ValueError, match="quantiles given without quantile_levels"):
            make(quantiles=np.zeros((4, 3, 1)))
        with pytest.raises(ValueError, match="regime_probs rows must sum to 1"):
            make(regime_probs=np.full((4, 2), 0.3))


class TestRegistry:
    def test_every_family_is_registered(self):
        assert {"ewma", "garch", "gjr", "egarch", "figarch", "har", "loghar", "regime", "gru", "tcn", "hybrid"} <= set(
            FORECASTERS
        )

    def test_get_forecaster_passes_parameters(self):
        f = get_forecaster("garch", dist="skewt", p=2)
        assert f.dist == "skewt" and f.p == 2 and f.vol == "GARCH"
        assert get_forecaster("gjr").o == 1 and get_forecaster("egarch").vol == "EGARCH"

    def test_unknown_model(self):
        with pytest.raises(ValueError, match="unknown model 'nope'; known: "):
            get_forecaster("nope")
