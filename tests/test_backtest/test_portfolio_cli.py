"""`volmargin margin --params-from RUN_DIR --as-of T`: the dynamic grid of a run applied to a portfolio file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from margin.accounts import Portfolio
from margin.dynamic_grid import GridPath, static_grid_path
from margin.engine import compute_margin
from volmargin.cli import app

ROOT = Path(__file__).resolve().parents[2]
PORTFOLIO = ROOT / "configs" / "examples" / "portfolio.json"
runner = CliRunner()


def _grid(tmp_path: Path) -> GridPath:
    times = pd.date_range("2025-12-25", periods=10, freq="D", tz="UTC")
    base = static_grid_path(times, ("BTC", "ETH"), 0.1)
    rng = np.linspace(0.05, 0.2, 10)[:, None] * np.ones((1, 2))
    corr = np.tile(np.array([[1.0, 0.6], [0.6, 1.0]]), (10, 1, 1))
    gp = GridPath(times=times, underlyings=("BTC", "ETH"), range_new=rng, range_open=rng, vol_shock=base.vol_shock,
                  correlation=corr, stress_weight=np.full(10, 0.3), concentration_addon=np.zeros((10, 2)))
    gp.write(tmp_path / "portfolio_grid.json")
    return gp


def test_round_trip(tmp_path):
    gp = _grid(tmp_path)
    back = GridPath.read(tmp_path / "portfolio_grid.json")
    assert back.times.equals(gp.times)
    np.testing.assert_array_equal(back.range_open, gp.range_open)
    np.testing.assert_array_equal(back.correlation, gp.correlation)
    assert back.index_at("2026-01-01T12:00:00Z") == 7


def test_params_from_run_dir(tmp_path):
    gp = _grid(tmp_path)
    r = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO), "--params-from", str(tmp_path), "--as-of",
                            "2026-01-01T12:00:00Z", "--mode", "portfolio", "--scenarios", "grid", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    pf = Portfolio.from_dict(json.loads(PORTFOLIO.read_text()))
    ref = compute_margin(pf, gp.params_at(7), "portfolio", scenarios="grid")
    assert [a["initial_margin"] for a in doc["accounts"]] == pytest.approx(ref.im.tolist(), rel=1e-12)
    # a later grid is wider: more margin
    r2 = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO), "--params-from", str(tmp_path), "--as-of",
                             "2026-01-03T00:00:00Z", "--mode", "portfolio", "--scenarios", "grid", "--json"])
    im2 = [a["initial_margin"] for a in json.loads(r2.output)["accounts"]]
    assert sum(im2) > sum(a["initial_margin"] for a in doc["accounts"])


def test_errors(tmp_path):
    _grid(tmp_path)
    r = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO)])
    assert r.exit_code == 2 and "exactly one of --params" in r.output
    r = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO), "--params-from", str(tmp_path), "--as-of",
                            "2020-01-01T00:00:00Z"])
    assert r.exit_code == 2 and "before the first grid" in r.output
    r = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO), "--params-from", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no portfolio_grid.json" in r.output
