"""training.job: the training job end to end with an injected loader (synthetic frames, tmp MLflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_walk_forward import synthetic_frame

from training.job import run_training
from volmargin.config import TrainConfig


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One SQLite store for the module (creating an MLflow database takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


def _cfg(tmp_path, name="job-test", db=None, **over):
    data = {
        "name": name,
        "seed": 1,
        "datasets": ["syn:A"],
        "cut": "2016-10-01",
        "horizon": 2,
        "walk_forward": {"min_train": 120, "refit_every": 40},  # _flaky_test raises on 120 and 160 bars
        "models": [{"name": "ewma"}, {"name": "ewma", "label": "ewma80", "params": {"lam": 0.8}}, {"name": "har"}],
        "promotion": {"mcs_reps": 100},
        "tracking_uri": db or f"sqlite:///{tmp_path / 'mlruns.db'}",
        "artifacts_dir": str(tmp_path / "artifacts"),
    }
    data.update(over)
    return TrainConfig.model_validate(data)


def _frame(perturb_after_cut: bool = False):
    f = synthetic_frame(420, seed=5)
    for c in ("har_1", "har_7", "har_30"):
        f[c] = f["var_gk"].rolling(int(c.split("_")[1]), min_periods=1).mean()
    if perturb_after_cut:
        post = f.index >= "2016-10-01"
        f.loc[post, "ret"] *= 3.0
        f.loc[post, "var_gk"] *= 9.0
    return f


def test_held_out_data_never_changes_the_choice(tmp_path, db):
    from training.registry import decide

    promo = {"register_models": False, "mcs_reps": 100}
    r1 = run_training(_cfg(tmp_path / "a", db=db, promotion=promo), loader=lambda ds: ("A", _frame()))
    r2 = run_training(_cfg(tmp_path / "b", db=db, promotion=promo), loader=lambda ds: ("A", _frame(perturb_after_cut=True)))
    a1, a2 = r1.evaluation["assets"]["syn:A"], r2.evaluation["assets"]["syn:A"]
    for k in ("ewma", "ewma80", "har"):
        assert a1["models"][k]["pre_cut"] == a2["models"][k]["pre_cut"]
        assert a1["models"][k]["held_out"]["qlike"] != a2["models"][k]["held_out"]["qlike"]
    assert a1["best_pre_cut"] == a2["best_pre_cut"]
    for champion in (None, "ewma", "ewma80", "har"):
        assert decide("syn:A", a1, champion) == decide("syn:A", a2, champion)
    # outputs on disk and in MLflow
    ev = json.loads(r1.evaluation_path.read_text())
    assert r1.evaluation_path.parent.name == r1.run_id == ev["parent_run_id"]
    assert (r1.out_dir / "held_out.csv").is_file()
    df = r1.held_out_table()
    assert len(df) == 3 and list(df["model"]) == ["ewma", "ewma80", "har"]


def test_second_job_challenger_gate(tmp_path, db):
    cfg = _cfg(tmp_path, db=db)
    run_training(cfg, loader=lambda ds: ("A", _frame()))
    r2 = run_training(cfg, loader=lambda ds: ("A", _frame()))
    d = r2.evaluation["assets"]["syn:A"]["decision"]
    # same data, same specs: the best candidate is the champion's own specification
    assert d["champion_before"] == d["candidate"] and d["promoted"]
    from training.registry import pinned_champion

    pin = pinned_champion("syn:A", "2016-10-01", artifacts_dir=tmp_path / "artifacts")
    assert pin.spec["key"] == d["champion_after"] and pin.model_version == "2"


@pytest.mark.slow
def test_workers_give_identical_results(tmp_path):
    c1 = _cfg(tmp_path / "a", promotion={"register_models": False, "mcs_reps": 100})
    c2 = _cfg(tmp_path / "b", promotion={"register_models": False, "mcs_reps": 100}, executor={"workers": 2})
    loader = lambda ds: ("A", _frame())  # noqa: E731
    from volmargin.executor import make_executor

    e1 = run_training(c1, loader=loader).evaluation["assets"]["syn:A"]
    e2 = run_training(c2, loader=loader, executor=make_executor(workers=2)).evaluation["assets"]["syn:A"]
    for k in e1["models"]:
        assert e1["models"][k]["pre_cut"]["qlike"] == e2["models"][k]["pre_cut"]["qlike"]
    assert "decision" not in e1


def test_bad_tracking_uri_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="plain file store"):
        run_training(_cfg(tmp_path, tracking_uri="mlruns"), loader=lambda ds: ("A", _frame()))
    with pytest.raises(ValueError, match=r"models\.0 \(nope\)"):
        run_training(_cfg(tmp_path, models=[{"name": "nope"}]), loader=lambda ds: ("A", _frame()))
    assert np.isfinite(1.0)


def test_failed_model_reported_and_left_out(tmp_path, db):
    cfg = _cfg(
        tmp_path, db=db, models=[{"name": "ewma"}, {"name": "_flaky_test"}], promotion={"register_models": False, "mcs_reps": 50}
    )
    ev = run_training(cfg, loader=lambda ds: ("A", _frame())).evaluation["assets"]["syn:A"]
    assert set(ev["models"]) == {"ewma"}
    assert "did not converge" in ev["failed"]["_flaky_test"]


class RecordingExecutor:
    """A TaskExecutor that is not volmargin's: runs tasks in reverse order and records them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def map_unordered(self, fn, tasks):
        for i in reversed(range(len(tasks))):
            self.seen.append(tasks[i].model_key)
            yield i, fn(tasks[i])


class TestExecutorInjection:
    def test_training_never_imports_volmargin(self):
        """Stage boundary: training/ is below volmargin/ (the job layer) and must not import it."""
        import ast
        from pathlib import Path

        import training

        offenders = []
        for path in Path(training.__file__).parent.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "volmargin"]
        assert offenders == []

    def test_injected_executor_runs_every_task(self, tmp_path, db):
        ex = RecordingExecutor()
        cfg = _cfg(tmp_path, db=db, promotion={"register_models": False, "mcs_reps": 50})
        ev = run_training(cfg, loader=lambda ds: ("A", _frame()), executor=ex).evaluation["assets"]["syn:A"]
        assert ex.seen == ["har", "ewma80", "ewma"]
        ref = run_training(cfg, loader=lambda ds: ("A", _frame())).evaluation["assets"]["syn:A"]
        for k in ("ewma", "ewma80", "har"):
            assert ev["models"][k]["held_out"]["qlike"] == ref["models"][k]["held_out"]["qlike"]

    def test_default_is_serial_and_says_when_config_asks_for_more(self, tmp_path, db, caplog):
        import logging

        cfg = _cfg(tmp_path, db=db, models=[{"name": "ewma"}], executor={"workers": 2},
                   promotion={"register_models": False, "mcs_reps": 50})
        with caplog.at_level(logging.WARNING, logger="training.job"):
            run_training(cfg, loader=lambda ds: ("A", _frame()))
        assert "no executor was passed" in caplog.text and "workers=2" in caplog.text

    def test_not_an_executor(self, tmp_path):
        with pytest.raises(TypeError, match="executor must have a map_unordered"):
            run_training(_cfg(tmp_path), loader=lambda ds: ("A", _frame()), executor=object())
