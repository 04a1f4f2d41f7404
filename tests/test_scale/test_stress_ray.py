"""The stress suite's tasks on Ray: the numbers of the sequential run (the driver alone writes stress.json)."""

from __future__ import annotations

import json

import pytest
from _support.stress import SMALL_SUITE

from stress.suite import load_settings, run_suite
from volmargin.executor import Executor
from volmargin.stress_job import executor_map, to_json

# two policies (a static pair and the dynamic grid) keep every task kind: builds, scenario, contagion, reverse
SUITE = {**SMALL_SUITE, "policies": [p for p in SMALL_SUITE["policies"] if p["name"] in ("static_best", "dynamic_grid")]}


@pytest.mark.slow  # the suite twice (~20 s on a quiet 2-core machine) plus Ray's start
def test_stress_suite_on_ray_equals_sequential(ray_local):
    seq = run_suite(load_settings(SUITE))
    on_ray = run_suite(load_settings(SUITE), map_fn=executor_map(Executor(backend="ray", address="auto", workers=2)))
    assert set(on_ray["scenarios"]) == {"drop_30pct_4bars", "contagion_bridge_outage"}
    assert set(on_ray["reverse_stress"]) == {"static_best", "dynamic_grid"}
    assert json.dumps(to_json(on_ray)) == json.dumps(to_json(seq))  # bit for bit
