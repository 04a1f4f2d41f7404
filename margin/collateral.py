"""Collateral valuation: tiered haircuts, size-dependent haircuts and a bridge-risk haircut.

For one balance with raw value ``V = amount * price`` (USD):

* the liquidity tier of the asset (stablecoin / major / long tail) gives a base haircut ``h0``;
* size brackets ``(t_k, e_k)`` (increasing thresholds) add ``e_k`` to the haircut of the part of ``V`` above
  ``t_k`` (marginal, like tax brackets; the haircut of a segment is capped at 1), so the valued amount never
  falls as the balance grows;
* collateral on a chain other than the venue's home chain is further multiplied by ``1 - bridge_haircut``.

Every factor is in [0, 1], so **haircuts never raise value**: ``0 <= value <= V`` for ``V >= 0``. Negative
balances (borrowed collateral) count at full face value, with no haircut benefit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from margin.params import CollateralHaircuts

__all__ = ["haircut_value", "slot_haircuts", "collateral_value"]


def haircut_value(
    raw_value: np.ndarray,
    base_haircut: np.ndarray | float,
    size_brackets: Sequence[tuple[float, float]] = (),
    off_chain: np.ndarray | bool = False,
    bridge_haircut: float = 0.0,
) -> np.ndarray:
    """Value after haircuts of raw collateral values (USD), vectorised.

    Parameters
    ----------
    raw_value : np.ndarray
        ``amount * price`` in USD, any shape.
    base_haircut : array_like
        Tier haircut per element (broadcast), fractions in [0, 1].
    size_brackets : sequence of (threshold, extra_haircut)
        Increasing thresholds in USD; the value above each threshold gets the extra haircut on top.
    off_chain : array_like of bool
        Whether the balance sits on a chain other than the home chain.
    bridge_haircut : float
        Extra multiplicative haircut for off-chain balances.

    Returns
    -------
    np.ndarray
        Haircut value, same shape as ``raw_value``; ``<= raw_value`` elementwise.
    """
    v = np.asarray(raw_value, dtype=np.float64)
    h0 = np.broadcast_to(np.asarray(base_haircut, dtype=np.float64), v.shape)
    pos = np.maximum(v, 0.0)
    if size_brackets:
        thresholds = np.array([t for t, _ in size_brackets], dtype=np.float64)
        extra = np.cumsum([e for _, e in size_brackets])
        lows = np.concatenate(([0.0], thresholds))
        highs = np.concatenate((thresholds, [np.inf]))
        hc = np.concatenate(([0.0], extra))
        out = np.zeros_like(pos)
        for lo, hi, e in zip(lows, highs, hc, strict=True):
            seg = np.clip(pos - lo, 0.0, hi - lo)
            out += seg * (1.0 - np.minimum(h0 + e, 1.0))
    else:
        out = pos * (1.0 - h0)
    out = out * np.where(np.asarray(off_chain, dtype=bool), 1.0 - bridge_haircut, 1.0)
    return np.where(v < 0, v, out)


def slot_haircuts(
    slots: Sequence[tuple[str, str]], cfg: CollateralHaircuts
) -> tuple[np.ndarray, np.ndarray]:
    """Base haircut and off-chain flag per (asset, chain) collateral slot."""
    base = np.array([cfg.base_haircut(a) for a, _ in slots], dtype=np.float64)
    off = np.array([c != cfg.home_chain for _, c in slots], dtype=bool)
    return base, off


def collateral_value(
    balances: np.ndarray,
    prices: np.ndarray,
    slots: Sequence[tuple[str, str]],
    configs: Sequence[CollateralHaircuts],
) -> np.ndarray:
    """Haircut collateral value per pool (row), USD.

    Parameters
    ----------
    balances : np.ndarray
        ``(A, C)`` amounts per collateral slot (asset units).
    prices : np.ndarray
        ``(C,)`` or ``(A, C)`` USD price per asset unit of each slot.
    slots : sequence of (asset, chain)
        The ``C`` slots.
    configs : sequence of CollateralHaircuts
        Haircut settings of the markets in force; each balance is valued under every config and the
        lowest value is used (the strictest market's haircuts bind).

    Returns
    -------
    np.ndarray
        ``(A,)`` haircut value in USD.
    """
    raw = np.asarray(balances, dtype=np.float64) * np.asarray(prices, dtype=np.float64)
    if not configs:
        configs = (CollateralHaircuts(),)
    vals = None
    for cfg in configs:
        base, off = slot_haircuts(slots, cfg)
        v = haircut_value(raw, base, cfg.size_brackets, off, cfg.bridge_haircut)
        vals = v if vals is None else np.minimum(vals, v)
    return vals.sum(axis=1)
