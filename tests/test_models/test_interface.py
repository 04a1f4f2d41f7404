"""One suite run over every registered forecaster (``models.FORECASTERS``).

Data: the data pipeline's regime-switching simulator (``make_frame(900, seed=3)``): the models are
fitted on the first 700 daily bars (A) and fed the next 200 (B). Each forecaster is built with its
``test_params()`` (small networks for the neural models).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pandas as pd
import pytest

from models import FORECASTERS, NotFittedError, VolatilityForecast

NAMES = sorted(FORECASTERS)
N_A, N_B = 700, 200
# one model per family in the default run; every model in the slow run
PYFUNC_FAST = {"ewma", "garch", "har", "regime", "gru"}


def build(name: str):
    cls = FORECASTERS[name]
    return cls(**cls.test_params())


@pytest.fixture(scope="module")
def data(make_feature_frame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    frame, _ = make_feature_frame(N_A + N_B, 3)
    return frame, frame.iloc[:N_A], frame.iloc[N_A:]


_CACHE: dict[str, object] = {}


@pytest.fixture()
def fitted(data):
    """Factory: a deep copy of the model fitted on A (fitted once per module)."""
    _, A, _ = data

    def get(name: str):
        if name not in _CACHE:
            _CACHE[name] = build(name).fit(A)
        return copy.deepcopy(_CACHE[name])

    return get


def perturb(frame: pd.DataFrame, start: int) -> pd.DataFrame:
    """Scale the returns (×3) and every variance column (×9) of the rows from ``start`` on."""
    out = frame.copy()
    var_cols = [c for c in out.columns if c.startswith(("var_", "har_")) or c == "rv"]
    out.iloc[start:, out.columns.get_loc("ret")] *= 3.0
    for c in var_cols:
        out.iloc[start:, out.columns.get_loc(c)] *= 9.0
    return out


@pytest.mark.parametrize("name", NAMES)
class TestForecasterInterface:
    def test_params_and_clone(self, name):
        f = build(name)
        params = f.get_params()
        for k, v in FORECASTERS[name].test_params().items():
            assert params[k] == v
        c = f.clone()
        assert c.get_params() == params and not c.is_fitted
        assert c.spec_hash() == f.spec_hash()
        with pytest.raises(ValueError, match="has no parameter 'not_a_param'"):
            f.set_params(not_a_param=1)

    def test_use_before_fit_raises(self, name, data):
        frame, _, B = data
        f = build(name)
        with pytest.raises(NotFittedError, match="not fitted"):
            f.predict_variance(1)
        with pytest.raises(NotFittedError, match="not fitted"):
            f.update(B)
        with pytest.raises(NotFittedError, match="not fitted"):
            f.filter(frame)

    def test_shapes_and_units(self, name, data, fitted):
        _, A, _ = data
        f = fitted(name)
        fc = f.predict_variance(7)
        assert isinstance(fc, VolatilityForecast)
        assert fc.variance.shape == (1, 7)
        assert fc.origins[0] == A.index[-1]
        assert fc.model == name
        assert list(fc.to_frame().columns) == [f"h.{k}" for k in range(1, 8)]
        # per-step variance in decimal units: same order as the recent mean squared return
        ms = float(np.nanmean(A["ret"].to_numpy()[-200:] ** 2))
        ratio = fc.variance[0] / ms
        assert np.all((ratio > 0.05) & (ratio < 20)), f"variance/mean-square ratios {ratio}"
        if fc.std_resid is not None:
            assert len(fc.std_resid) > 100 and np.all(np.isfinite(fc.std_resid))
            assert 0.5 < np.std(fc.std_resid) < 2.0
        if fc.quantiles is not None:
            assert fc.quantiles.shape == (1, 7, len(fc.quantile_levels))
            assert np.all(np.diff(fc.quantiles, axis=2) >= 0)
        if fc.regime_probs is not None:
            np.testing.assert_allclose(fc.regime_probs.sum(axis=1), 1.0, atol=1e-9)
        for bad in (0, -1, 1.5):
            with pytest.raises(ValueError, match="horizon must be a positive integer"):
                f.predict_variance(bad)

    def test_deterministic_given_seed(self, name, data):
        _, A, _ = data
        a = build(name).fit(A).predict_variance(5)
        b = build(name).fit(A).predict_variance(5)
        np.testing.assert_array_equal(a.variance, b.variance)
        if a.quantiles is not None:
            np.testing.assert_array_equal(a.quantiles, b.quantiles)

    def test_no_look_ahead(self, name, data, fitted):
        """Origins before bar k give the same forecasts whatever happens from bar k on."""
        _, _, B = data
        k, n = 40, 60
        B2 = perturb(B, k)
        f1, f2 = fitted(name), fitted(name)
        changed_after = False
        for i in range(n):
            a = f1.update(B.iloc[i : i + 1]).predict_variance(3)
            b = f2.update(B2.iloc[i : i + 1]).predict_variance(3)
            if i < k:
                np.testing.assert_array_equal(a.variance, b.variance, err_msg=f"origin {i} saw bar {k}")
            elif not np.allclose(a.variance, b.variance, rtol=1e-6):
                changed_after = True
        assert changed_after, "the perturbation never reached the forecasts (test would be vacuous)"

    def test_update_equals_refit_free_rerun(self, name, data, fitted):
        """fit(A).update(B) == fit(A).filter(A + B): same parameters, state rebuilt from scratch."""
        frame, _, B = data
        f = fitted(name).update(B.iloc[:70]).update(B.iloc[70:])
        g = fitted(name).filter(frame)
        assert f.last_time_ == g.last_time_ == frame.index[-1]
        a, b = f.predict_variance(5), g.predict_variance(5)
        np.testing.assert_allclose(a.variance, b.variance, rtol=1e-8)
        if a.std_resid is not None:
            assert len(a.std_resid) == len(b.std_resid)
            # 1e-6: the networks run in float32 and batch size changes GEMM round-off
            np.testing.assert_allclose(a.std_resid, b.std_resid, rtol=1e-6, atol=1e-10)
        if a.regime_probs is not None:
            np.testing.assert_allclose(a.regime_probs, b.regime_probs, atol=1e-10)
        if a.quantiles is not None:
            np.testing.assert_allclose(a.quantiles, b.quantiles, rtol=1e-7)
        # and the state really moved: forecasts from the end of A differ
        assert not np.allclose(fitted(name).predict_variance(5).variance, a.variance, rtol=1e-9)

    def test_bar_by_bar_updates_equal_refit_free_rerun(self, name, data, fitted):
        """The walk-forward pattern (update one bar, predict, repeat) ends in the same state as filter."""
        frame, _, B = data
        f = fitted(name)
        for i in range(30):
            f.update(B.iloc[i : i + 1]).predict_variance(2)
        g = fitted(name).filter(frame.iloc[: N_A + 30])
        a, b = f.predict_variance(3), g.predict_variance(3)
        np.testing.assert_allclose(a.variance, b.variance, rtol=1e-8)
        if a.std_resid is not None:
            # 1e-6: the networks run in float32 and batch size changes GEMM round-off
            np.testing.assert_allclose(a.std_resid, b.std_resid, rtol=1e-6, atol=1e-10)

    def test_pickle_round_trip(self, name, data, fitted):
        _, _, B = data
        f = fitted(name)
        g = pickle.loads(pickle.dumps(f))
        np.testing.assert_array_equal(f.update(B.iloc[:3]).predict_variance(4).variance,
                                      g.update(B.iloc[:3]).predict_variance(4).variance)


def _pyfunc_params():
    return [pytest.param(n, marks=() if n in PYFUNC_FAST else pytest.mark.slow) for n in NAMES]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite tracking store per module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


@pytest.mark.parametrize("name", _pyfunc_params())
def test_mlflow_pyfunc_round_trip(name, data, fitted, mlflow_uri, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from models.pyfunc import load_forecaster, log_forecaster, to_model_input

    _, A, B = data
    uri = mlflow_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        f = fitted(name)
        from training.tracking import use_experiment

        use_experiment("pyfunc-test", uri)  # artifacts beside the test's database, not in the working directory
        with mlflow.start_run():
            info = log_forecaster(f, name="model", input_example=A.iloc[-3:], horizon=3)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        out = loaded.predict(to_model_input(B.iloc[:4]), params={"horizon": 3})
        # reference: the original model updated bar by bar
        ref = []
        g = copy.deepcopy(f)
        for i in range(4):
            ref.append(g.update(B.iloc[i : i + 1]).predict_variance(3).variance[0])
        np.testing.assert_allclose(out[["h.1", "h.2", "h.3"]].to_numpy(), np.array(ref), rtol=1e-9)
        assert list(pd.to_datetime(out["origin"])) == list(B.index[:4].tz_localize(None))
        # logged from code (nothing cloudpickled): the default horizon comes back from model_config
        default = loaded.predict(to_model_input(B.iloc[:4]))
        assert [c for c in default.columns if c.startswith("h.")] == ["h.1", "h.2", "h.3"]
        assert loaded.metadata.flavors["python_function"].get("model_code_path")
        # the wrapper never mutates the logged model; the raw forecaster loads back too
        back = load_forecaster(info.model_uri)
        assert back.last_time_ == A.index[-1]
        np.testing.assert_allclose(back.predict_variance(2).variance, f.predict_variance(2).variance, rtol=1e-12)
    finally:
        mlflow.set_tracking_uri(None)
