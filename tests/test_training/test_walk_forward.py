"""training.walk_forward and training.evaluation on synthetic frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.base import FORECASTERS, Forecaster, VolatilityForecast, register
from models.ewma import EWMA
from training.evaluation import evaluate_asset, row_losses
from training.walk_forward import WalkForwardTask, make_folds, run_tasks, walk_forward


def synthetic_frame(n: int = 400, seed: int = 42) -> pd.DataFrame:
    """GARCH(1,1) returns with a Garman-Klass-like proxy (decimal log returns per day)."""
    rng = np.random.default_rng(seed)
    omega, alpha, beta = 2e-6, 0.08, 0.9
    s = omega / (1 - alpha - beta)
    ret = np.empty(n)
    var = np.empty(n)
    for t in range(n):
        var[t] = s
        ret[t] = np.sqrt(s) * rng.standard_normal()
        s = omega + alpha * ret[t] ** 2 + beta * s
    idx = pd.date_range("2016-01-01", periods=n, freq="D", tz="UTC")
    gk = var * rng.chisquare(4, n) / 4
    return pd.DataFrame({"ret": ret, "var_gk": gk, "true_var": var}, index=idx)


def make_task(frame, model="ewma", key=None, params=None, **kw) -> WalkForwardTask:
    base = dict(
        asset="SYN",
        frame=frame,
        model_name=model,
        model_key=key or model,
        params=params or {},
        horizon=3,
        cut=pd.Timestamp("2016-10-01"),
        min_train=100,
        refit_every=25,
        block=50,
    )
    base.update(kw)
    return WalkForwardTask(**base)


class TestFolds:
    def test_split_at_cut_and_cover_all_origins(self):
        folds = make_folds(300, min_train=100, block=50, cut_pos=175)
        assert folds[0].start == 99 and folds[-1].end == 300
        assert all(a.end == b.start for a, b in zip(folds, folds[1:], strict=False))
        assert any(f.end == 175 for f in folds) and any(f.start == 175 for f in folds)
        assert all(f.post_cut == (f.start >= 175) for f in folds)

    def test_rolling_window_start(self):
        folds = make_folds(300, min_train=100, block=50, cut_pos=300, window="rolling", window_size=80)
        assert all(f.train_start == max(0, f.start + 1 - 80) for f in folds)

    def test_errors(self):
        with pytest.raises(ValueError, match="fewer than min_train=100"):
            make_folds(50, min_train=100, block=10, cut_pos=50)


class TestWalkForward:
    def test_shapes_flags_and_targets(self):
        frame = synthetic_frame()
        res = walk_forward(make_task(frame))
        n = len(frame)
        assert len(res.forecast) == n - 99 and res.forecast.horizon == 3
        assert res.forecast.origins[0] == frame.index[99]
        cut_pos = frame.index.get_loc(pd.Timestamp("2016-10-01", tz="UTC"))
        pos = np.arange(99, n)
        np.testing.assert_array_equal(res.post_cut, pos >= cut_pos)
        np.testing.assert_array_equal(res.pre_cut, pos + 3 < cut_pos)
        # targets: y.k at origin t is the proxy of bar t+k
        assert res.targets.iloc[0]["y.2"] == frame["var_gk"].iloc[101]
        assert np.isnan(res.targets.iloc[-1]["y.1"])
        assert res.returns.iloc[5]["r.1"] == frame["ret"].iloc[105]
        table = res.table()
        assert {"h.1", "y.3", "r.1", "post_cut"} <= set(table.columns)
        assert sum(f.n_origins for f in res.folds) == len(res.forecast)

    def test_equals_plain_fit_update_loop(self):
        """refit_every beyond the data: one fit at the first origin, then update; compare with a loop."""
        frame = synthetic_frame(250)
        res = walk_forward(make_task(frame, refit_every=10_000, block=10_000, horizon=1, cut=pd.Timestamp("2030-01-01")))
        m = EWMA().fit(frame.iloc[:100])
        ref = [m.predict_variance(1).variance[0, 0]]
        for i in range(100, 250):
            m.update(frame.iloc[i : i + 1])
            ref.append(m.predict_variance(1).variance[0, 0])
        np.testing.assert_allclose(res.forecast.variance[:, 0], ref, rtol=1e-12)

    def test_refit_schedule_matches_manual_refits(self):
        frame = synthetic_frame(220)
        res = walk_forward(make_task(frame, horizon=1, refit_every=30, block=60, cut=pd.Timestamp("2030-01-01")))
        # origin 99 + 30 = 129 is a refit point: forecast equals a fresh fit on bars 0..129
        i = 129
        fresh = EWMA().fit(frame.iloc[: i + 1]).predict_variance(1).variance[0, 0]
        assert res.forecast.variance[i - 99, 0] == pytest.approx(fresh, rel=1e-12)
        assert res.folds[0].n_refits == 2

    @pytest.mark.parametrize("model", ["ewma", "har"])
    def test_no_look_ahead(self, model):
        if model not in FORECASTERS:
            import models  # noqa: F401
        if model not in FORECASTERS:
            pytest.skip(f"{model} not registered yet")
        base = synthetic_frame(300)
        k = 220
        changed = base.copy()
        changed.iloc[k:, changed.columns.get_loc("ret")] *= 5.0
        changed.iloc[k:, changed.columns.get_loc("var_gk")] *= 25.0
        if model == "har":  # every variance column (and the HAR lags) is rebuilt from the changed bars
            base, changed = _har_columns(base), _har_columns(changed)
        frame = base
        res1 = walk_forward(make_task(frame, model=model))
        res2 = walk_forward(make_task(changed, model=model))
        before = res1.forecast.origins < frame.index[k]
        np.testing.assert_array_equal(res1.forecast.variance[before], res2.forecast.variance[before])
        assert not np.allclose(res1.forecast.variance[~before], res2.forecast.variance[~before])

    def test_purge_and_rolling_run(self):
        frame = synthetic_frame(260)
        res = walk_forward(make_task(frame, purge=5, window="rolling", window_size=90))
        assert len(res.forecast) == 161 and np.all(res.forecast.variance > 0)
        assert res.folds[1].train_start == str(frame.index[res.folds[1].fold * 0 + 149 + 1 - 90])

    def test_failed_refit_falls_back_and_is_counted(self):
        frame = synthetic_frame(200)
        res = walk_forward(make_task(frame, model="_flaky_test", horizon=1, refit_every=20, block=40))
        assert res.n_fallbacks == 2  # the fits on 120 and 160 bars raise
        assert np.all(np.isfinite(res.forecast.variance))

    def test_failed_forecast_carries_previous_and_is_counted(self):
        frame = synthetic_frame(200)
        res = walk_forward(make_task(frame, model="_flaky_test", params={"scale": 2.0}, horizon=1, refit_every=1000, block=1000))
        # the scale-2 model's forecast at bar 150 is infinite: the origin-149 forecast is carried
        i = 150 - 99
        assert res.forecast.variance[i, 0] == res.forecast.variance[i - 1, 0]
        assert res.forecast.origins[i] == frame.index[150]
        assert res.n_fallbacks == 1

    def test_failed_task_is_reported_not_raised(self):
        from training.walk_forward import TaskFailure, run_task

        out = run_task(make_task(synthetic_frame(200), model="_flaky_test", min_train=120))
        assert isinstance(out, TaskFailure) and "did not converge" in out.error

    def test_executor_processes_match_in_process(self):
        from volmargin.executor import Executor

        frame = synthetic_frame(200)
        tasks = [make_task(frame), make_task(frame, key="ewma97", params={"lam": 0.97})]
        seq = dict(run_tasks(tasks))
        par = dict(run_tasks(tasks, Executor(workers=2)))
        for i in range(2):
            np.testing.assert_array_equal(seq[i].forecast.variance, par[i].forecast.variance)
            assert seq[i].model == par[i].model

    def test_ray_without_ray_fails_clearly(self, monkeypatch):
        import sys

        from volmargin.executor import Executor

        with pytest.raises(ValueError, match="needs an address"):
            Executor(backend="ray")
        monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
        with pytest.raises(ValueError, match="'ray' package, which is not installed"):
            Executor(backend="ray", address="auto").map(abs, [1])
        with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
            Executor(workers=0)


def _har_columns(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    v = out["var_gk"]
    out["har_1"] = v
    out["har_7"] = v.rolling(7, min_periods=1).mean()
    out["har_30"] = v.rolling(30, min_periods=1).mean()
    for c in ("var_sq", "var_pk", "var_rs", "var_yz", "rv"):
        out[c] = v
    return out


@register
class _FlakyForecaster(Forecaster):
    """Constant-variance model whose fits on 120 and 160 bars raise (tests the fallback path)."""

    name = "_flaky_test"
    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale

    def _fit(self, frame):
        if len(frame) in (120, 160):
            raise RuntimeError("did not converge")
        self.v_ = float(np.mean(frame["ret"].to_numpy() ** 2)) * self.scale

    def _update(self, new_bars):
        pass

    def _predict(self, horizon):
        v = self.v_
        if self.scale == 2.0 and self.n_obs_ == 151:
            v = np.inf  # one broken forecast (the base class rejects it)
        return self._forecast(np.full(horizon, v))


@pytest.fixture(scope="module")
def results():
    frame = synthetic_frame(500, seed=1)
    out = {}
    for key, params in (("ewma", {}), ("ewma80", {"lam": 0.8}), ("flat", None)):
        if params is None:
            t = make_task(frame, model="_flaky_test", key="flat", params={"scale": 1.0}, refit_every=10_000, block=10_000)
        else:
            t = make_task(frame, key=key, params=params)
        out[key] = walk_forward(t)
    return out


class TestEvaluation:
    def test_structure_and_reference_numbers(self, results):
        ev = evaluate_asset(results, var_levels=[0.95, 0.99], mcs_reps=200, seed=0)
        m = ev["models"]["ewma"]
        res = results["ewma"]
        y = res.targets.to_numpy()[res.held_out]
        f = res.forecast.variance[res.held_out]
        ok = np.isfinite(y)
        ref = np.mean(y[ok] / f[ok] - np.log(y[ok] / f[ok]) - 1)
        assert m["held_out"]["qlike"] == pytest.approx(ref, rel=1e-12)
        assert set(m["pre_cut"]["dm"]) == {"ewma80", "flat"}
        assert 0 <= m["pre_cut"]["dm"]["flat"]["pvalue"] <= 1
        assert "in_mcs" in m["pre_cut"] and ev["mcs"]["pre_cut"]["included"]
        assert m["held_out"]["var"]["0.99"]["traffic_light"] in ("green", "yellow", "red")
        import json

        json.dumps(ev)  # serialisable

    def test_held_out_rows_do_not_change_pre_cut_numbers(self, results):
        ev1 = evaluate_asset(results, mcs_reps=200, seed=0)
        tampered = {}
        for k, r in results.items():
            v = np.array(r.forecast.variance)
            v[r.post_cut] *= 1000.0 if k == "ewma" else 0.001
            fc = VolatilityForecast(origins=r.forecast.origins, variance=v, model=k)
            tampered[k] = type(r)(**{**r.__dict__, "forecast": fc})
        ev2 = evaluate_asset(tampered, mcs_reps=200, seed=0)
        for k in results:
            assert ev1["models"][k]["pre_cut"] == ev2["models"][k]["pre_cut"]
            assert ev1["models"][k]["held_out"] != ev2["models"][k]["held_out"]
        assert ev1["mcs"]["pre_cut"] == ev2["mcs"]["pre_cut"]

    def test_row_losses_average_steps(self, results):
        res = results["ewma"]
        s = row_losses(res)
        y, f = res.targets.to_numpy()[0], res.forecast.variance[0]
        assert s.iloc[0] == pytest.approx(np.mean(y / f - np.log(y / f) - 1))


def test_var_breaches_normal_and_model_quantiles():
    from scipy import stats

    from training.evaluation import evaluate_asset, var_breach_series

    frame = synthetic_frame(300, seed=3)
    res = walk_forward(make_task(frame, model="garch", horizon=1, refit_every=10_000, block=10_000))
    assert res.forecast.quantiles is not None
    r = res.returns["r.1"].to_numpy()
    ok = np.isfinite(r)
    normal = var_breach_series(res, 0.99)
    expected = (r < stats.norm.ppf(0.01) * np.sqrt(res.forecast.variance[:, 0])).astype(float)
    np.testing.assert_array_equal(normal[ok], expected[ok])
    j = list(res.forecast.quantile_levels).index(0.01)
    own = var_breach_series(res, 0.99, model_quantiles=True)
    np.testing.assert_array_equal(own[ok], (r < res.forecast.quantiles[:, 0, j]).astype(float)[ok])
    ev = evaluate_asset({"garch": res}, mcs_reps=50)
    assert "var_model_quantiles" in ev["models"]["garch"]["held_out"]


class TestModelDiagnostics:
    def test_garch_refits_pass_no_starting_value_warning_and_count_it(self, monkeypatch):
        """Where arch still rejects starting values, the warning is caught at the fit call, counted in the
        model's diagnostics and reported per fold; the caller of the walk-forward sees none."""
        import warnings

        from arch.utility.exceptions import StartingValueWarning

        import models.garch as mg

        # arch rejects these starts (alpha + beta > 1) while the feasibility check is told they are fine
        monkeypatch.setattr(mg, "_feasible_start", lambda am, y, sv, margin=1e-6: np.array([sv[0], 0.5, 0.6, sv[3]]))
        monkeypatch.setattr(mg, "_is_feasible", lambda am, y, sv: True)
        frame = synthetic_frame(400, seed=3)
        task = make_task(frame, model="garch", params={"quantile_levels": None}, min_train=300, refit_every=25,
                         block=50, cut=pd.Timestamp("2030-01-01"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = walk_forward(task)
        assert not [w for w in caught if issubclass(w.category, StartingValueWarning)]
        refits = sum(f.n_refits for f in res.folds)
        assert refits == 5  # origins 299..399 in folds of 50: refits at 299, 324 | 349, 374 | 399
        # every refit after the first (cold) one is warm-started and arch warns once
        assert res.diagnostics.get("start_warnings") == refits - 1
        assert [f.diagnostics.get("start_warnings", 0) for f in res.folds] == [1, 2, 1]
        assert res.folds[0].to_dict()["diagnostics"] == res.folds[0].diagnostics

    def test_har_floor_binds_reported_per_fold(self):
        # variance ~1e-4, spikes each followed by a quiet bar, a 100x spike on the last bar: the linear HAR
        # prediction at the last origin is negative and floored (tests/test_models/test_har.py::spike_frame)
        rng = np.random.default_rng(0)
        v = 1e-4 * np.exp(0.3 * rng.standard_normal(600))
        for t in range(20, 598, 25):
            v[t], v[t + 1] = 5e-4, 1e-5
        v[-1] = 1e-2
        idx = pd.date_range("2016-01-01", periods=600, freq="D", tz="UTC")
        frame = pd.DataFrame({"ret": np.sqrt(v) * rng.standard_normal(600), "var_gk": v}, index=idx)
        task = make_task(frame, model="har", params={"column": "var_gk", "max_horizon": 1}, horizon=1,
                         min_train=599, refit_every=1, block=1, cut=pd.Timestamp("2030-01-01"))
        res = walk_forward(task)
        assert res.diagnostics["floor_binds"] == 1 and res.folds[-1].diagnostics["floor_binds"] == 1
