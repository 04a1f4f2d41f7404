"""A small stress suite (every task kind, every policy kind but the predictive fit) for the executor tests."""

from __future__ import annotations

from typing import Any

SMALL_SUITE: dict[str, Any] = {
    "name": "stress-small",
    "population": {"n_positions": 250, "seed": 1, "hold_mean_bars": 30, "hold_max_bars": 120},
    "backtest": {"fund_initial": 5000, "max_steps_per_bar": 5},
    "impact": {"kind": "sqrt", "coef": 0.3, "depth_usd": 10000000},
    "agents": {"momentum_usd": 5000, "mean_reversion_usd": 2000, "mm_absorb": 0.2, "mm_capacity_usd": 100000},
    "feedback_rounds": 1,
    "budget": {"collateral": 0.2, "calibration_bars": 200, "im_grid": [0.05, 0.15, 0.4], "mm_fractions": [0.5],
               "mm_fixed": [0.03]},
    "policies": [{"name": "static_best", "kind": "static"},
                 {"name": "ewma_ccp", "kind": "ewma_ccp"},
                 {"name": "garch_fhs", "kind": "garch_fhs", "params": {"n_sims": 300}},
                 {"name": "predictive", "kind": "predictive", "params": {"level": 0.1, "power": 0.5}},
                 {"name": "dynamic_grid", "kind": "dynamic_grid", "params": {"k": 3.0},
                  "fit": {"mm_fraction": [0.5, 0.8]}}],
    "scenarios": {"hypothetical": {"source": "bundled:tsd/BTC-15m", "lead": 48, "tail": 24,
                                   "drop": {"size": 0.3, "bars": 4}, "calibration_bars": 240},
                  "contagion": {"lead": 20, "tail": 5, "cases": {"bridge_outage": {"bridge_outage": True, "drop": 0.1}}}},
    "reverse": {"base": "hypothetical", "shock_bars": 4, "tol": 0.1, "max_size": 0.6},
    "venues": {"n_traders": 80},
}


def strip_series(x: Any) -> Any:
    """The suite's output without the per-bar frames (what stress.json holds, before JSON)."""
    import pandas as pd

    if isinstance(x, dict):
        return {k: strip_series(v) for k, v in x.items() if not isinstance(v, pd.DataFrame)}
    return x
