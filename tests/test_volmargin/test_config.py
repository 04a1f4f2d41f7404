"""volmargin.config: YAML configs validated by pydantic, unknown keys named."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from volmargin.config import DEFAULT_CUTS, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "name": "t",
    "datasets": ["bundled:bitstamp/BTC"],
    "models": [{"name": "ewma"}],
}


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


class TestTrainConfig:
    def test_defaults(self, tmp_path):
        cfg = load_config(_write(tmp_path, MINIMAL))
        assert isinstance(cfg, TrainConfig)
        assert cfg.horizon == 1 and cfg.proxy == "gk" and cfg.var_levels == [0.95, 0.99]
        assert cfg.walk_forward.window == "expanding" and cfg.walk_forward.block == cfg.walk_forward.refit_every
        assert cfg.cut_for("bundled:bitstamp/BTC") == dt.date(2018, 1, 1)
        assert cfg.executor.backend == "local" and cfg.artifacts_dir == "artifacts"
        assert cfg.tracking_uri is None and not cfg.allow_file_store

    def test_default_cuts(self):
        assert DEFAULT_CUTS["bundled:tsd/BTC-1d"] == dt.date(2021, 1, 1)
        assert DEFAULT_CUTS["bundled:tsd/BTC-15m"] == dt.date(2021, 11, 15)
        assert DEFAULT_CUTS["bundled:coinbase-pro/LTC"] == dt.date(2018, 1, 1)

    def test_explicit_cut_wins(self, tmp_path):
        cfg = load_config(_write(tmp_path, {**MINIMAL, "cut": "2019-06-01"}))
        assert cfg.cut_for("bundled:bitstamp/BTC") == dt.date(2019, 6, 1)

    @pytest.mark.parametrize(
        ("patch", "match"),
        [
            ({"bogus": 1}, r"bogus: unknown key 'bogus'"),
            ({"walk_forward": {"refit_evry": 5}}, r"walk_forward\.refit_evry: unknown key 'refit_evry'"),
            ({"models": [{"name": "ewma", "parms": {}}]}, r"models\.0\.parms: unknown key 'parms'"),
            ({"promotion": {"dm_alpha": 1.5}}, r"promotion\.dm_alpha: .*less than 1"),
            ({"horizon": 0}, r"horizon: .*greater than or equal to 1"),
            ({"proxy": "parkinson"}, r"proxy: .*'gk', 'sq' or 'rv'"),
            ({"var_levels": [0.99, 1.2]}, r"var_levels: .*VaR level must be in \(0.5, 1\), got 1.2"),
            ({"executor": {"backend": "dask"}}, r"executor\.backend"),
            ({"walk_forward": {"window_size": 100}}, r"window_size is only used with window: rolling"),
        ],
    )
    def test_bad_values_named(self, tmp_path, patch, match):
        with pytest.raises(ValueError, match=match) as ei:
            load_config(_write(tmp_path, {**MINIMAL, **patch}))
        assert "c.yaml" in str(ei.value)

    def test_missing_key(self, tmp_path):
        with pytest.raises(ValueError, match=r"datasets: required key missing"):
            load_config(_write(tmp_path, {"name": "x", "models": [{"name": "ewma"}]}))

    def test_duplicate_model_keys(self, tmp_path):
        data = {**MINIMAL, "models": [{"name": "ewma"}, {"name": "ewma", "params": {"lam": 0.97}}]}
        with pytest.raises(ValueError, match=r"duplicated: \['ewma'\]"):
            load_config(_write(tmp_path, data))
        data["models"][1]["label"] = "ewma97"
        cfg = load_config(_write(tmp_path, data))
        assert [m.key for m in cfg.models] == ["ewma", "ewma97"]
        assert cfg.baselines_for("ewma") == ["ewma97"]

    def test_unknown_dataset_needs_cut(self, tmp_path):
        with pytest.raises(ValueError, match="no default cut"):
            load_config(_write(tmp_path, {**MINIMAL, "datasets": ["csv:foo.csv"]}))
        cfg = load_config(_write(tmp_path, {**MINIMAL, "datasets": ["csv:foo.csv"], "cut": "2020-01-01"}))
        assert cfg.cut_for("csv:foo.csv") == dt.date(2020, 1, 1)

    def test_file_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="config file not found"):
            load_config(tmp_path / "nope.yaml")
        p = tmp_path / "bad.yaml"
        p.write_text("- a\n- b\n")
        with pytest.raises(ValueError, match="must be a mapping"):
            load_config(p)
        p.write_text("a: [1, 2\n")
        with pytest.raises(ValueError, match="invalid YAML"):
            load_config(p)
        with pytest.raises(ValueError, match="config kind must be one of"):
            load_config(_write(tmp_path, MINIMAL), kind="nope")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("train_*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_validate(path):
    cfg = load_config(path)
    assert cfg.models and cfg.datasets
