"""Build any margin policy by name (the mappings of :mod:`margin.policies` and :mod:`margin.predictive`).

The factory lives in the backtest stage, where the job layer and the stress stage build policies from
config names; ``margin`` keeps the policies themselves and never imports ``backtest``.
"""

from __future__ import annotations

from typing import Any

from margin.policies import EwmaCcpPolicy, GarchFhsPolicy, OracleVolPolicy, StaticPolicy
from margin.predictive import PredictivePolicy

__all__ = ["make_policy", "POLICY_NAMES"]

POLICY_NAMES: tuple[str, ...] = ("static_<im>", "ewma_ccp", "garch_fhs", "predictive", "oracle_vol")


def make_policy(name: str, **cfg: Any) -> Any:
    """Build a policy by name: ``static_<im>`` (or ``static`` with ``im=``, and ``mm=`` or ``mm_fraction=``),
    ``ewma_ccp``, ``garch_fhs``, ``predictive``, ``oracle_vol``. The bound is not a policy (it has no path that
    one market could publish): see :mod:`backtest.bound`.

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
    except TypeError as exc:
        raise ValueError(f"bad config for policy {name!r}: {exc}") from None
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
