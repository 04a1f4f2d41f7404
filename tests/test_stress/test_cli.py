"""``volmargin stress``: a small config end to end (stress.json keys, report), and exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from volmargin.cli import app

SMALL = {
    "name": "stress-test",
    "population": {"n_positions": 300, "seed": 1, "hold_mean_bars": 40, "hold_max_bars": 200},
    "backtest": {"fund_initial": 5000, "max_steps_per_bar": 5},
    "impact": {"kind": "sqrt", "coef": 0.3, "depth_usd": 10000000},
    "agents": {"momentum_usd": 5000, "mm_absorb": 0.2, "mm_capacity_usd": 100000},
    "feedback_rounds": 0,
    "budget": {"collateral": 0.2, "calibration_bars": 200, "im_grid": [0.05, 0.15, 0.4], "mm_fractions": [0.5],
               "mm_fixed": [0.03]},
    "policies": [{"name": "static_best", "kind": "static"},
                 {"name": "ewma_ccp", "kind": "ewma_ccp"},
                 {"name": "predictive", "kind": "predictive", "params": {"level": 0.1, "power": 0.5}}],
    "scenarios": {"hypothetical": {"source": "bundled:tsd/BTC-15m", "lead": 48, "tail": 24,
                                   "drop": {"size": 0.3, "bars": 4}, "calibration_bars": 300},
                  "contagion": {"lead": 20, "tail": 5, "cases": {"bridge_outage": {"bridge_outage": True, "drop": 0.1}}}},
    "reverse": {"base": "hypothetical", "shock_bars": 4, "tol": 0.1, "max_size": 0.6},
    "venues": {"n_traders": 100},
}


@pytest.mark.slow
def test_stress_cli_end_to_end(tmp_path):
    cfg = tmp_path / "stress.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["stress", "--config", str(cfg), "--out", str(out), "--no-mlflow"])
    assert r.exit_code == 0, r.output
    js = json.loads((out / "stress.json").read_text())
    keys = {"cascade_depth", "liquidated_notional", "impact_from_liquidations", "bad_debt", "fund_min", "cover2_ok",
            "self_inflicted_share"}
    assert set(js["scenarios"]) == {"drop_30pct_4bars", "contagion_bridge_outage"}
    for sc in js["scenarios"].values():
        assert set(sc["policies"]) == {"static_best", "ewma_ccp", "predictive"}
        for m in sc["policies"].values():
            assert keys <= set(m)
            assert abs(m["budget"]["pre_window_avg_collateral"] - 0.2) <= 0.002  # equal capital before the window
        assert sc["budget"]["spread"] <= 0.005
        assert sorted(sc["ranking"]) == sorted(sc["policies"])
    assert set(js["reverse_stress"]) == {"static_best", "ewma_ccp", "predictive"}
    assert js["scenarios"]["drop_30pct_4bars"]["budget"]["calibration"]["bars"] == 300
    assert js["scenarios"]["contagion_bridge_outage"]["budget"]["calibrated_on"] == "drop_30pct_4bars"
    assert js["headline"]["statement"].startswith("At equal capital")
    assert js["headline"]["least_amplifying"] in js["scenarios"]["drop_30pct_4bars"]["policies"]
    html = (out / "stress_report.html").read_text()
    assert "amplifies cascades least" in html and "pre-window avg collateral" in html and "data:image/png;base64," in html and "http" not in html


def test_bad_config_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "impact": {"kind": "cubic"}}))
    r = CliRunner().invoke(app, ["stress", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-mlflow"])
    assert r.exit_code == 2
    assert "impact.kind must be 'none', 'linear' or 'sqrt', got 'cubic'" in r.output
    r = CliRunner().invoke(app, ["stress", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["stress", "--config", str(cfg), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert r.exit_code == 2 and "--workers must be >= 1, got 0" in " ".join(r.output.split())
