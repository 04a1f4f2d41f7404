"""The suite's tasks through an executor: a local process pool gives the sequential run's numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from _support.stress import SMALL_SUITE, strip_series

from stress.compare import KEYS
from stress.suite import load_settings, run_suite
from volmargin.executor import Executor
from volmargin.stress_job import executor_map, to_json


@pytest.fixture(scope="module")
def sequential():
    return run_suite(load_settings(SMALL_SUITE))


class TestSuite:
    def test_every_policy_every_scenario_all_keys(self, sequential):
        names = {p["name"] for p in SMALL_SUITE["policies"]}
        assert set(sequential["scenarios"]) == {"drop_30pct_4bars", "contagion_bridge_outage"}
        for sc in sequential["scenarios"].values():
            assert set(sc["policies"]) == names and sorted(sc["ranking"]) == sorted(names)
            for m in sc["policies"].values():
                assert set(KEYS) <= set(m) and 0.0 <= m["self_inflicted_share"] <= 1.0
                assert abs(m["budget"]["pre_window_avg_collateral"] - 0.2) <= 0.002
        grid = sequential["scenarios"]["drop_30pct_4bars"]["policies"]["dynamic_grid"]
        assert grid["budget"]["method"] == "fit" and grid["budget"]["grid"]["mm_fraction"] in (0.5, 0.8)
        assert set(sequential["reverse_stress"]) == names

    def test_local_pool_gives_the_sequential_numbers(self, sequential):
        with Executor(workers=2) as ex:
            pooled = run_suite(load_settings(SMALL_SUITE), map_fn=executor_map(ex))
        # stress.json bit for bit (each task runs with one BLAS thread wherever it runs)
        assert json.dumps(to_json(pooled)) == json.dumps(to_json(sequential))
        assert strip_series(pooled) == strip_series(sequential)
        for name, sc in sequential["scenarios"].items():
            for p, m in sc["policies"].items():
                pd.testing.assert_frame_equal(pooled["scenarios"][name]["policies"][p]["series"], m["series"])
