"""volmargin.executor: the same tasks give the same numbers in process, in a local pool and on Ray."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd
import pytest
from _support.frames import daily_frame

from training.walk_forward import TaskFailure, WalkForwardTask, run_tasks
from volmargin.executor import Executor, TaskError, make_executor

CUT = pd.Timestamp("2017-03-01", tz="UTC")  # bar 425 of 460


def _tasks(frame: pd.DataFrame) -> list[WalkForwardTask]:
    specs = [
        ("ewma", "ewma", {}),
        ("ewma", "ewma90", {"lam": 0.90}),
        ("har", "har", {}),
        ("garch", "garch", {}),
        ("gru", "gru", {"lookback": 10, "hidden": 4, "horizon": 2, "max_epochs": 2, "min_train_windows": 50}),
    ]
    # the GRU forecasts every origin with its network: 60 origins keep it to a few seconds
    return [
        WalkForwardTask(asset="SYN", frame=frame.iloc[:360] if name == "gru" else frame, model_name=name,
                        model_key=key, params=params, horizon=2, cut=CUT, min_train=300, refit_every=200,
                        block=200, seed=4)
        for name, key, params in specs
    ]


@pytest.fixture(scope="module")
def wf_tasks():
    return _tasks(daily_frame(460))


@pytest.fixture(scope="module")
def local_results(wf_tasks):
    """The local run: ``Executor()`` (in this process), BLAS and torch on one thread as in a worker."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return dict(run_tasks(wf_tasks, Executor()))
    finally:
        torch.set_num_threads(threads)


class TestRayMatchesLocal:
    def test_walk_forward_forecasts_identical(self, ray_local, wf_tasks, local_results):
        ray_results = dict(run_tasks(wf_tasks, Executor(backend="ray", address="auto", workers=2)))
        assert sorted(ray_results) == sorted(local_results) == list(range(len(wf_tasks)))
        for i, task in enumerate(wf_tasks):
            a, b = local_results[i], ray_results[i]
            assert not isinstance(a, TaskFailure) and not isinstance(b, TaskFailure), (a, b)
            assert a.model == b.model == task.model_key
            # bit for bit: both run one thread per task, the same seed, the same code
            np.testing.assert_array_equal(a.forecast.variance, b.forecast.variance, err_msg=task.model_key)
            np.testing.assert_array_equal(a.forecast.origins, b.forecast.origins)
            assert [f.n_refits for f in a.folds] == [f.n_refits for f in b.folds]

    def test_neural_quantiles_identical(self, ray_local, wf_tasks, local_results):
        ray_results = dict(run_tasks(wf_tasks[-1:], Executor(backend="ray", address="auto")))
        a, b = local_results[len(wf_tasks) - 1], ray_results[0]
        assert a.forecast.quantiles is not None
        np.testing.assert_array_equal(a.forecast.quantiles, b.forecast.quantiles)

    def test_results_in_task_order_and_every_index_once(self, ray_local):
        # Ray workers import ``fn`` by name: a library function, not one defined in a test module
        ex = Executor(backend="ray", address="auto", workers=3)  # cap of 3 in flight over 40 tasks
        seen = dict(ex.map_unordered(math.sqrt, [float(i * i) for i in range(40)]))
        assert sorted(seen) == list(range(40)) and all(seen[i] == i for i in seen)
        assert ex.map(math.sqrt, [2.25, 4.0, 9.0]) == [1.5, 2.0, 3.0]
        assert Executor(backend="ray", address="auto").map(math.sqrt, []) == []

    def test_failed_task_names_its_index(self, ray_local):
        with pytest.raises(TaskError, match="task 3 failed: ValueError: math domain error") as info:
            Executor(backend="ray", address="auto").map(math.sqrt, [0.0, 1.0, 4.0, -1.0, 9.0])
        assert info.value.index == 3


class TestLocalPool:
    def test_one_pool_for_every_map_inside_a_with_block(self):
        from _pids import pid

        with Executor(workers=2) as ex:
            first, second = ex.map(pid, list(range(6))), ex.map(pid, list(range(6)))
            assert ex._state["pool_size"] == 2
        pids = set(first) | set(second)
        assert len(pids) <= 2 and os.getpid() not in pids  # the same two workers served both maps
        assert "pool" not in ex._state  # shut down at the end of the block


class TestErrors:
    def test_ray_not_installed(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
        with pytest.raises(ValueError, match=r"needs the 'ray' package.*volmargin\[distributed\]"):
            Executor(backend="ray", address="auto").map(abs, [1])

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"backend": "ray"}, "needs an address"),
            ({"workers": 0}, "workers must be >= 1, got 0"),
            ({"backend": "dask"}, "backend must be 'local' or 'ray', got 'dask'"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            make_executor(**kwargs)
