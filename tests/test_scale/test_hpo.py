"""training.hpo: trials on pre-cut folds only, scores equal the gate's, every trial logged, best config gated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _support.frames import daily_frame

from training.evaluation import evaluate_asset
from training.hpo import HpoSettings, evaluate_trial, promote_best, run_search, train_window
from training.walk_forward import WalkForwardTask, walk_forward

CUT = "2017-03-01"  # bar 425 of 560


def _settings(tmp_path=None, db=None, **over) -> HpoSettings:
    data = {
        "name": "hpo-test",
        "dataset": "syn:A",
        "cut": CUT,
        "horizon": 2,
        "seed": 3,
        "walk_forward": {"min_train": 250, "refit_every": 50},
        "model": {"name": "ewma"},
        "search_space": {"lam": {"type": "float", "low": 0.80, "high": 0.99}},
        "n_trials": 4,
        "sampler": "random",
        "points_to_evaluate": [{"lam": 0.94}],
        "promotion": {"mcs_reps": 100},
    }
    if tmp_path is not None:
        data["artifacts_dir"] = str(tmp_path / "artifacts")
    if db is not None:
        data["tracking_uri"] = db
    data.update(over)
    return HpoSettings.model_validate(data)


@pytest.fixture(scope="module")
def frame():
    return daily_frame()


@pytest.fixture(scope="module")
def db(mlflow_db):
    return mlflow_db


def _gate_qlike(frame: pd.DataFrame, lam: float, settings: HpoSettings) -> float:
    """Reference: the full walk-forward (held-out bars included) scored by training.evaluation, as the gate is."""
    res = walk_forward(WalkForwardTask(asset="A", frame=frame, model_name="ewma", model_key="ewma",
                                       params={"lam": lam}, horizon=2, cut=pd.Timestamp(CUT, tz="UTC"),
                                       min_train=250, refit_every=50, block=50, seed=3))
    ev = evaluate_asset({"ewma": res}, baselines={"ewma": []}, var_levels=[0.99], mcs_size=0.1, mcs_reps=20, seed=0)
    return ev["models"]["ewma"]["pre_cut"]["qlike"]


class TestTrials:
    def test_scores_equal_the_gates_pre_cut_qlike(self, frame):
        s = _settings()
        out = run_search(s, frame)
        assert [t.number for t in out.trials] == [0, 1, 2, 3] and out.trials[0].params == {"lam": 0.94}
        for t in out.trials:
            assert t.ok and 0.80 <= t.params["lam"] <= 0.99
            np.testing.assert_allclose(t.score, _gate_qlike(frame, t.params["lam"], s), rtol=1e-12)
            # per-origin losses for the search-wide SPA test: one per pre-cut origin, all before the cut
            assert len(t.losses) == len(t.origins) == t.n_origins and np.isfinite(t.losses).all()
            assert max(pd.Timestamp(o) for o in t.origins) < pd.Timestamp(CUT, tz="UTC")
        assert out.best.score == min(t.score for t in out.trials)

    def test_held_out_bars_never_reach_a_trial(self, frame):
        shocked = frame.copy()
        post = shocked.index >= pd.Timestamp(CUT, tz="UTC")
        for c in ("ret", "var_gk", "var_sq"):
            shocked.loc[post, c] = shocked.loc[post, c] * 9.0
        a, b = run_search(_settings(), frame), run_search(_settings(), shocked)
        assert [t.score for t in a.trials] == [t.score for t in b.trials]
        assert len(train_window(frame, CUT)) == int((~post).sum())

    def test_failed_trial_is_recorded_not_raised(self, frame):
        s = _settings(search_space={"lam": {"type": "float", "low": 0.5, "high": 1.5}},
                      points_to_evaluate=[{"lam": 1.2}], n_trials=1)
        with pytest.raises(RuntimeError, match="every one of the 1 trials failed; first error: ValueError"):
            run_search(s, frame)

    def test_neural_trial(self, frame):
        s = _settings(model={"name": "gru", "params": {"lookback": 10, "hidden": 4, "horizon": 2,
                                                       "min_train_windows": 50}, "refit_every": 200},
                      search_space={"max_epochs": {"type": "int", "low": 1, "high": 3},
                                    "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
                      points_to_evaluate=[], n_trials=1, cut="2016-10-15")
        out = run_search(s, frame)
        t = out.trials[0]
        assert t.ok and t.n_origins > 0 and set(t.params) == {"max_epochs", "lr"}
        again = evaluate_trial(_trial_task(s, frame, t.params))  # a seeded neural trial is reproducible
        assert again.score == t.score


def _trial_task(s: HpoSettings, frame: pd.DataFrame, params: dict):
    from training.hpo import TrialTask, _base_task

    base = _base_task(s, frame)
    return TrialTask(**{**{k: getattr(base, k) for k in base.__dataclass_fields__}, "number": 0,
                        "params": {**base.params, **params}})


class TestTracking:
    def test_each_trial_a_nested_run(self, frame, db, tmp_path):
        from mlflow.tracking import MlflowClient

        out = run_search(_settings(tmp_path, db), frame, tracking_uri=db)
        client = MlflowClient(db)
        parent = client.get_run(out.search_run_id)
        assert parent.data.tags["job"] == "hpo" and parent.info.status == "FINISHED"
        assert parent.data.metrics["best_qlike_pre_cut"] == out.best.score
        kids = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{out.search_run_id}'")
        assert len(kids) == 4
        by_trial = {int(r.data.tags["trial"]): r for r in kids}
        for t in out.trials:
            assert by_trial[t.number].data.metrics["qlike_pre_cut"] == t.score
            assert float(by_trial[t.number].data.params["lam"]) == t.params["lam"]

    def test_best_goes_through_the_promotion_gate(self, frame, db, tmp_path):
        from training.config import TrainSettings
        from training.job import run_training
        from training.registry import registered_name

        name = "syn:B"
        # a champion first: EWMA with its default lambda, trained as `volmargin train` would
        champ = TrainSettings(name="hpo-test", datasets=[name], cut=CUT, horizon=2, seed=3,
                              walk_forward={"min_train": 250, "refit_every": 50}, models=[{"name": "ewma"}],
                              tracking_uri=db, artifacts_dir=str(tmp_path / "artifacts"), promotion={"mcs_reps": 100})
        first = run_training(champ, loader=lambda ds: ("B", frame))
        assert first.evaluation["assets"][name]["decision"]["champion_after"] == "ewma"
        s = _settings(tmp_path, db, dataset=name, points_to_evaluate=[{"lam": 0.97}], n_trials=3)
        out = promote_best(s, run_search(s, frame, tracking_uri=db), frame)
        p = out.promotion
        assert p["models"] == ["ewma", "ewma-hpo"]
        d = p["decision"]
        assert d["champion_before"] == "ewma"
        # the searched config is registered iff the gate picks it as the candidate (lowest pre-cut QLIKE)
        better = p["pre_cut_qlike"]["ewma-hpo"] < p["pre_cut_qlike"]["ewma"]
        assert p["registered"] == better == (d["candidate"] == "ewma-hpo")
        # a searched config replacing the champion also needs the SPA test of all 3 trials against it
        sel = p["selection_test"]
        assert sel["benchmark"] == "ewma" and sel["trials"] == 3 and 0.0 <= sel["pvalue"] <= 1.0
        assert sel["origins"] == out.trials[0].n_origins
        if d["candidate"] == "ewma-hpo":
            assert d["checks"]["selection"]["pvalue"] == sel["pvalue"]
            assert d["promoted"] <= (sel["pvalue"] < 0.05)
        np.testing.assert_allclose(p["pre_cut_qlike"]["ewma-hpo"], out.best.score, rtol=1e-12)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(db)
        aliases = client.get_registered_model(registered_name(name)).aliases
        if better and not d["promoted"]:
            v = client.get_model_version(registered_name(name), aliases["challenger"])
            assert v.tags["model_key"] == "ewma-hpo" and v.tags["decision"] == "challenger"
        search_run = client.get_run(out.search_run_id)
        assert search_run.data.tags["promotion_run_id"] == p["run_id"]
        assert search_run.data.metrics["spa_pvalue_vs_champion"] == sel["pvalue"]


class TestTune:
    @pytest.mark.slow  # Ray Tune's trial actors and bookkeeping: ~30 s for two trials on 2 cores
    def test_tune_gives_the_optuna_numbers(self, ray_local, frame, tmp_path):
        pts = [{"lam": 0.90}, {"lam": 0.97}]
        s = _settings(tmp_path, points_to_evaluate=pts, n_trials=2, concurrent=2)
        local = run_search(s, frame)
        tuned = run_search(s, frame, engine="tune")
        assert tuned.engine == "tune" and len(tuned.trials) == 2
        got = {t.params["lam"]: t.score for t in tuned.trials}
        want = {t.params["lam"]: t.score for t in local.trials}
        assert got == want


class TestSettings:
    @pytest.mark.parametrize(
        ("over", "match"),
        [
            ({"search_space": {"nope": {"type": "float", "low": 0, "high": 1}}}, r"search_space keys \['nope'\]"),
            ({"search_space": {"lam": {"type": "float", "low": 0.9, "high": 0.8}}}, "low must be < high, got low=0.9"),
            ({"search_space": {"lam": {"type": "categorical"}}}, "needs a non-empty 'choices'"),
            ({"points_to_evaluate": [{"lam": 0.5}]}, r"points_to_evaluate.0.lam = 0.5 is outside"),
            ({"n_trials": 0}, "n_trials"),
            ({"cut": None}, "no default cut for dataset 'syn:A'"),
            ({"model": {"name": "nope"}}, "model:"),
        ],
    )
    def test_errors(self, over, match):
        with pytest.raises(ValueError, match=match):
            _settings(**over)

    def test_optuna_not_installed(self, frame, monkeypatch):
        import sys

        monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
        with pytest.raises(ValueError, match=r"needs the 'optuna' package.*volmargin\[distributed\]"):
            run_search(_settings(), frame)

    def test_too_few_bars_before_the_cut(self, frame):
        with pytest.raises(ValueError, match="too few for walk_forward.min_train=250"):
            run_search(_settings(cut="2016-08-01"), frame)
