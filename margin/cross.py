"""Cross margin: one collateral pool per account; offsetting positions in the same underlying net.

Exchange-style rule (the ``cross`` mode of :mod:`margin.engine`):

* futures and perpetuals on the same underlying are netted into one delta notional per underlying
  (linear: ``q c F``; inverse: ``q c`` USD) and charged the market's tiered IM/MM rates on
  ``|net notional|`` (mark notional);
* options are charged per position with the standard option rule (:func:`margin.isolated.option_margin`);
* the close-fee term (``close_fee_in_mm``) adds ``taker_fee_rate * gross notional`` to MM.

The scenario variant (:func:`scenario_cross_margin`) applies the *same risk measure* as portfolio margin to
each underlying separately and sums: it is the "cross" of the property ``portfolio <= cross <= isolated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from margin.instruments import InstrumentArrays
from margin.isolated import option_margin, tier_table, tiered_requirement
from margin.params import MarginParams, RiskMeasureName
from margin.portfolio import scenario_margin

__all__ = ["net_linear_notional", "cross_requirements", "scenario_cross_margin"]


def net_linear_notional(positions: np.ndarray, arrays: InstrumentArrays, mark: np.ndarray) -> np.ndarray:
    """``(A, U)`` net signed notional (USD) of futures/perps per underlying; options excluded.

    ``mark`` is ``(I,)`` or per-row ``(A, I)``.
    """
    p = np.asarray(positions, dtype=np.float64)
    lin = ~arrays.is_option
    per = np.broadcast_to(np.where(arrays.is_inverse, arrays.contract_size, arrays.contract_size * mark) * lin, p.shape)
    out = np.zeros((p.shape[0], len(arrays.underlyings_unique)))
    np.add.at(out.T, arrays.underlying_index, (p * per).T)
    return out


def cross_requirements(
    positions: np.ndarray,
    arrays: InstrumentArrays,
    mark: np.ndarray,
    contract_mark: np.ndarray,
    params_by_underlying: Sequence[MarginParams],
    now: datetime | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(IM, MM) per account row in USD under cross margin.

    Parameters
    ----------
    positions : np.ndarray
        ``(A, I)`` contracts.
    arrays : InstrumentArrays
    mark : np.ndarray
        ``(I,)`` (or per-row ``(A, I)``) underlying/forward mark per instrument.
    contract_mark : np.ndarray
        ``(I,)`` or ``(A, I)`` option premium per unit for options (unused for futures/perps).
    params_by_underlying : sequence of MarginParams
        One per ``arrays.underlyings_unique``.
    now : datetime, optional
        UTC time selecting pending MM rates.
    """
    p = np.asarray(positions, dtype=np.float64)
    mark = np.broadcast_to(np.asarray(mark, dtype=np.float64), p.shape)
    contract_mark = np.broadcast_to(np.asarray(contract_mark, dtype=np.float64), p.shape)
    net = np.abs(net_linear_notional(p, arrays, mark))
    im = np.zeros(p.shape[0])
    mm = np.zeros(p.shape[0])
    for u, prm in enumerate(params_by_underlying):
        i_u, m_u = tiered_requirement(net[:, u], tier_table(prm.tiers_at(now)))
        im += i_u
        mm += m_u
        if prm.close_fee_in_mm:
            cols = (arrays.underlying_index == u) & ~arrays.is_option
            per = np.where(arrays.is_inverse, arrays.contract_size, arrays.contract_size * mark)
            gross = (np.abs(p[:, cols]) * per[:, cols]).sum(axis=1)
            mm += gross * prm.taker_fee_rate
    o = np.flatnonzero(arrays.is_option)
    for i in o:
        prm = params_by_underlying[arrays.underlying_index[i]]
        oi, om = option_margin(
            p[:, i], mark[:, i], arrays.strike[i], arrays.is_call[i], contract_mark[:, i], arrays.contract_size[i],
            prm.option_rule,
        )
        im += oi
        mm += om
    return im, mm


def scenario_cross_margin(
    positions: np.ndarray,
    s: np.ndarray,
    arrays: InstrumentArrays,
    measure: RiskMeasureName = "max",
    confidence: float = 0.99,
) -> np.ndarray:
    """``(A,)`` scenario risk measure applied per underlying and summed (USD)."""
    return scenario_margin(positions, s, arrays.underlying_index, measure, confidence)
