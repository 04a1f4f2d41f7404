"""Build any margin policy by name: the deployable mappings of :mod:`margin` and the bound of this stage.

The factory lives here, not in :mod:`margin.policies`, because the ``bound`` (a perfect-foresight cohort
optimizer) needs the simulation; ``margin`` never imports ``backtest``.
"""

from __future__ import annotations

from typing import Any

from backtest.bound import BoundPolicy
from margin.policies import EwmaCcpPolicy, GarchFhsPolicy, OracleVolPolicy, StaticPolicy
from margin.predictive import PredictivePolicy

__all__ = ["make_policy", "POLICY_NAMES"]

POLICY_NAMES: tuple[str, ...] = ("static_<im>", "ewma_ccp", "garch_fhs", "predictive", "oracle_vol", "bound")


def make_policy(name: str, **cfg: Any) -> Any:
    """Build a policy by name: ``static_<im>``, ``ewma_ccp``, ``garch_fhs``, ``predictive``, ``oracle_vol``,
    ``bound`` (needs ``population``; ``bound_liquidations`` / ``bound_bad_debt`` set the objective).

    Raises
    ------
    ValueError
        Unknown name, or a keyword the policy does not take (the message names the policy).
    """
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {type(name).__name__}")
    try:
        if name.startswith("static_"):
            try:
                im = float(name[len("static_"):])
            except ValueError:
                raise ValueError(f"static policy name must be static_<im> with im a number, got {name!r}") from None
            return StaticPolicy(im=im, **cfg)
        if name == "static":
            return StaticPolicy(**cfg)
        if name == "ewma_ccp":
            return EwmaCcpPolicy(**cfg)
        if name == "garch_fhs":
            return GarchFhsPolicy(**cfg)
        if name == "predictive":
            return PredictivePolicy(**cfg)
        if name == "oracle_vol":
            return OracleVolPolicy(**cfg)
        if name in ("bound", "bound_liquidations", "bound_bad_debt"):
            if name != "bound":
                cfg = {**cfg, "objective": name[len("bound_"):]}
            if "population" not in cfg:
                raise ValueError("policy 'bound' needs population= (it optimizes per cohort of positions)")
            if "grid" in cfg:
                cfg["grid"] = tuple(cfg["grid"])
            return BoundPolicy(**cfg)
    except TypeError as exc:
        raise ValueError(f"bad config for policy {name!r}: {exc}") from None
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
