"""Helpers of the serving tests (constants, a markets config on bundled data with fast models)."""

from __future__ import annotations

import json
from pathlib import Path

KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"


def markets_doc(tmp_path: Path, cache_dir: Path, **market_overrides) -> dict:
    eth = {
        "input": "bundled:coinbase-pro/ETH", "underlying": "ETH",
        "model": {"name": "vol-ETH", "alias": "champion", "fit": {"name": "ewma", "params": {}}, "horizon": 3,
                  "window": 60},
        "policy": {"name": "ewma_ccp", "params": {"lam": 0.94, "confidence": 0.99, "horizon": 2, "apc": "buffer"}},
        "controls": {"floor": 0.02, "ceiling": 0.5, "max_change": 0.25, "notice": "1h", "min_interval": 0,
                     "mm_fraction": 0.5},
        "failsafe": {"static_im": 0.12, "buffer": 0.25},
        "valid_for": "2h",
    }
    btc = {
        **eth, "input": "bundled:bitstamp/BTC", "underlying": "BTC",
        "model": {**eth["model"], "name": "vol-BTC"},
        "policy": {"name": "garch_fhs", "params": {"confidence": 0.99, "horizon": 2, "measure": "es", "n_sims": 2000}},
        "tiers": [{"max_notional": 1_000_000, "multiplier": 1.0}, {"max_notional": None, "multiplier": 2.0}],
        "scenario_grid": {"dynamic": True, "sigmas": 4.0, "points": 7},
    }
    markets = {"ETH-PERP": eth, "BTC-PERP": btc}
    for mk, over in market_overrides.items():
        markets[mk] = {**markets.get(mk, eth), **over}
    return {"feed": {"chain_id": 1, "verifying_contract": "0x" + "11" * 20, "db": str(tmp_path / "feed.db"),
                     "cache_dir": str(cache_dir)}, "markets": markets}


def write_yaml(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(doc))))
    return path
