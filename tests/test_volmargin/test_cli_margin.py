"""`volmargin margin` through Typer's CliRunner: table, JSON, and exit 2 with JSON path and value."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from volmargin.cli import app

ROOT = Path(__file__).resolve().parents[2]
PORTFOLIO = ROOT / "configs" / "examples" / "portfolio.json"
PARAMS = ROOT / "configs" / "examples" / "params.json"
FIX = ROOT / "tests" / "fixtures" / "margin"
runner = CliRunner()


def flat(text: str) -> str:
    return "".join(text.split())


def invoke(*args: str):
    return runner.invoke(app, ["margin", *args])


@pytest.mark.parametrize("mode", ["isolated", "cross", "portfolio"])
def test_json_output_per_mode(mode):
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(PARAMS), "--mode", mode, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["mode"] == mode
    assert [a["account"] for a in doc["accounts"]] == ["alice", "bob", "carol"]
    for a in doc["accounts"]:
        assert a["maintenance_margin"] <= a["initial_margin"] + 1e-9
        assert a["health_factor"] is None or a["health_factor"] > 0


def test_cross_numbers_by_hand():
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(PARAMS), "--json")
    alice = json.loads(r.output)["accounts"][0]
    assert alice["initial_margin"] == pytest.approx(3_100.0)
    assert alice["health_factor"] == pytest.approx(23_600 / 1_550)
    # 19,600 + 2 (P - 88,000) = 0.01 * 2 P - 250  ->  P = (176,000 - 19,600 - 250) / 1.98
    assert alice["liquidation_price"] == pytest.approx((176_000 - 19_600 - 250) / 1.98, rel=1e-9)


def test_table_output():
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(PARAMS), "--mode", "portfolio")
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    assert "alice" in out and "carol" in out and "1.093" in out


def _write(tmp_path: Path, name: str, doc) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def _bad_portfolio(tmp_path, mutate):
    d = json.loads(PORTFOLIO.read_text())
    mutate(d)
    return _write(tmp_path, "portfolio.json", d)


def _bad_params(tmp_path, mutate):
    d = json.loads(PARAMS.read_text())
    mutate(d)
    return _write(tmp_path, "params.json", d)


CASES_PORTFOLIO = [
    ("non-numeric size", lambda d: d["accounts"][0]["positions"][0].update(size="ten"),
     "$.accounts[0].positions[0].size", "'ten'"),
    ("unknown instrument", lambda d: d["accounts"][1]["positions"][0].update(instrument="DOGE-PERP"),
     "$.accounts[1].positions[0].instrument", "DOGE-PERP"),
    ("negative collateral", lambda d: d["accounts"][0]["collateral"][0].update(amount=-5),
     "$.accounts[0].collateral[0].amount", "-5"),
    ("non-positive price", lambda d: d["marks"]["underlyings"].update(BTC=0),
     "$.marks.underlyings.BTC", "0"),
    ("subaccount bad size", lambda d: d["accounts"][1]["subaccounts"][0]["positions"][0].update(size=[1]),
     "$.accounts[1].subaccounts[0].positions[0].size", "[1]"),
]


@pytest.mark.parametrize(("name", "mutate", "path", "value"), CASES_PORTFOLIO, ids=[c[0] for c in CASES_PORTFOLIO])
def test_invalid_portfolio_exits_2(tmp_path, name, mutate, path, value):
    p = _bad_portfolio(tmp_path, mutate)
    r = invoke("--portfolio", str(p), "--params", str(PARAMS))
    assert r.exit_code == 2, r.output
    out = flat(r.output)
    assert flat(path) in out and flat(value) in out


def test_nan_size_exits_2():
    r = invoke("--portfolio", str(FIX / "portfolio_nan_size.json"), "--params", str(PARAMS))
    assert r.exit_code == 2
    assert flat("$.accounts[0].positions[0].size") in flat(r.output) and "nan" in r.output.lower()


CASES_PARAMS = [
    ("mm above im", lambda d: d["markets"][1].update(mm_rate=0.5), "$.markets[1]", "mm_rate=0.5"),
    ("rate above one", lambda d: d["markets"][1].update(im_rate=1.7), "$.markets[1].im_rate", "1.7"),
    ("rate zero", lambda d: d["markets"][0]["tiers"][0].update(mm_rate=0), "$.markets[0].tiers[0].mm_rate", "0"),
    ("nan rate", lambda d: d["markets"][1].update(im_rate=float("nan")), "$.markets[1].im_rate", "nan"),
]


@pytest.mark.parametrize(("name", "mutate", "path", "value"), CASES_PARAMS, ids=[c[0] for c in CASES_PARAMS])
def test_invalid_params_exits_2(tmp_path, name, mutate, path, value):
    p = _bad_params(tmp_path, mutate)
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(p))
    assert r.exit_code == 2, r.output
    out = flat(r.output)
    assert flat(path) in out and flat(value) in out


def test_missing_file_and_bad_mode(tmp_path):
    r = invoke("--portfolio", str(tmp_path / "nope.json"), "--params", str(PARAMS))
    assert r.exit_code == 2 and "not found" in r.output
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(PARAMS), "--mode", "spicy")
    assert r.exit_code == 2 and "--mode" in r.output


def test_missing_market_names_it(tmp_path):
    p = _bad_params(tmp_path, lambda d: d.update(markets=d["markets"][:1]))
    r = invoke("--portfolio", str(PORTFOLIO), "--params", str(p))
    assert r.exit_code == 2 and "'ETH'" in r.output


def test_examples_unchanged_by_roundtrip():
    d = json.loads(PARAMS.read_text())
    from margin.params import ParamsFile

    assert ParamsFile.from_dict(copy.deepcopy(d)).to_dict() == d
