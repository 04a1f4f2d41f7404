"""EWMA against a plain loop and against pandas' ewm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.ewma import EWMA, ewma_filter


def _loop(r: np.ndarray, lam: float, s0: float) -> np.ndarray:
    out = [s0]
    for x in r:
        out.append(lam * out[-1] + (1 - lam) * x * x)
    return np.array(out)


class TestEWMA:
    def test_filter_matches_plain_loop(self):
        r = np.random.default_rng(42).standard_normal(1000) * 0.03
        np.testing.assert_allclose(ewma_filter(r, 0.94, 1e-3), _loop(r, 0.94, 1e-3), rtol=1e-10)

    def test_matches_pandas_ewm(self):
        # pandas' adjust=False ewm with alpha = 1 - lam, seeded with s0 as the first observation
        r = np.random.default_rng(42).standard_normal(500) * 0.02
        s0 = 4e-4
        x = pd.Series(np.concatenate([[s0], r**2]))
        ref = x.ewm(alpha=1 - 0.97, adjust=False).mean().to_numpy()
        np.testing.assert_allclose(ewma_filter(r, 0.97, s0), ref, rtol=1e-10)

    def test_forecaster_flat_term_structure(self, feature_frame):
        f = EWMA(lam=0.94, init_bars=30).fit(feature_frame)
        r = feature_frame["ret"].dropna().to_numpy()
        s = _loop(r, 0.94, float(np.mean(r[:30] ** 2)))
        fc = f.predict_variance(5)
        np.testing.assert_allclose(fc.variance[0], np.full(5, s[-1]), rtol=1e-10)
        assert fc.origins[0] == feature_frame.index[-1]
        np.testing.assert_allclose(fc.std_resid, r / np.sqrt(s[:-1]), rtol=1e-10)

    @pytest.mark.parametrize("lam", [0.0, 1.0, -0.5, 1.5])
    def test_bad_lambda(self, feature_frame, lam):
        with pytest.raises(ValueError, match=r"lam must be in \(0, 1\)"):
            EWMA(lam=lam).fit(feature_frame)
