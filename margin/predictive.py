"""The ``predictive`` margin policy: a mapping from forecasts to IM and MM.

:class:`PredictivePolicy` maps the champion's out-of-sample forecast (1-step and H-step volatility, the
quantile-implied volatility when the forecast has quantiles) and the stressed-regime probability to an IM
path, and (``mm_k``) to an MM path. Its parameters are chosen before the cut by ``backtest.fit`` (the search
needs the simulation, so it lives in the backtest stage).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import norm

from margin.controls import apply_controls
from margin.path import MarginPath
from margin.policies import (
    PolicyContext,
    aligned_stress,
    aligned_variance,
    mm_controlled,
    slow_release,
    var_to_im,
)

__all__ = ["PredictivePolicy", "is_increase_cap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictivePolicy:
    """The optimizer's mapping from forecasts to IM (then the controls; MM = ``mm_fraction × IM``).

    ``IM_raw = max(floor, level × (σ_t / sigma_ref)^power × (1 + stress × p_stressed_t))`` with
    ``σ_t = exp(ω ln σ1 + (1-ω) ln σH)`` (σ1: the 1-step forecast volatility, σH: the root mean per-step
    variance over the forecast's horizon), blended geometrically with the quantile-implied volatility
    (``quantile_weight``) when the forecast has quantiles; ``sigma_ref`` is the median σ before the cut.
    ``power < 1`` is a sub-proportional response, ``> 1`` super-proportional, 0 static.
    ``release`` (in (0, 1]): the largest relative fall of the raw IM per bar, so that margin raised in a
    volatile spell is released slowly (crashes cluster); 1 = no hold (the controls' cap still applies).
    ``mm_binds``: ``"path"`` (the MM binds on open positions, increases after the notice)
    or ``"entry"`` (each position keeps the MM of its entry bar: only new positions see changes, an
    entry-IM policy like the bound). Both are in the fit's grid.
    ``mm_k``: the MM mapping. 0 (default): ``MM = mm_fraction × IM`` as for every other policy. ``> 0``: MM
    covers a ``mm_k``-sigma one-bar move, ``MM_t = exp(mm_k σ1_t) - 1`` (σ1: the 1-step forecast volatility),
    the close-out (gap) risk a maintenance margin exists for, while IM keeps pricing the holding-horizon risk;
    it then gets the controls (change cap, notice, floor ``mm_fraction × floor``) and never exceeds IM.
    ``mm_floor`` (with ``mm_k > 0``): a floor on that MM, so that a calm forecast does not leave open
    positions with almost no buffer when a jump starts from calm (0: the controls' floor only).
    ``mm_fraction`` (with ``mm_k = 0``): MM as this fraction of IM instead of the controls' ``mm_fraction``
    (the same MM control the static pairs have).
    """

    level: float = 0.10
    power: float = 0.5
    stress: float = 0.0
    omega: float = 0.5
    floor: float = 0.01
    quantile_weight: float = 0.5
    release: float = 1.0
    mm_binds: Literal["path", "entry"] = "path"
    mm_k: float = 0.0
    mm_floor: float = 0.0
    mm_fraction: float | None = None
    sigma_ref: float | None = None
    name: str = "predictive"
    fitted: dict[str, Any] = field(default_factory=dict, compare=False)

    def params(self) -> dict[str, float]:
        """Numeric parameters (``mm_at_entry``: 1.0 when MM is fixed at entry, 0.0 when it follows the path;
        ``mm_fraction`` 0.0: the controls' fraction)."""
        return {"level": self.level, "power": self.power, "stress": self.stress, "omega": self.omega,
                "floor": self.floor, "quantile_weight": self.quantile_weight, "release": self.release,
                "mm_at_entry": 1.0 if self.mm_binds == "entry" else 0.0, "mm_k": self.mm_k,
                "mm_floor": self.mm_floor,
                "mm_fraction": 0.0 if self.mm_fraction is None else self.mm_fraction,
                "sigma_ref": float("nan") if self.sigma_ref is None else self.sigma_ref}

    @staticmethod
    def features(ctx: PolicyContext) -> dict[str, np.ndarray]:
        var, has = aligned_variance(ctx)
        s1 = np.sqrt(var[:, 0])
        sh = np.sqrt(var.mean(axis=1))
        out = {"s1": s1, "sh": sh, "stress": aligned_stress(ctx), "has": has}
        fc = ctx.forecast
        if fc is not None and fc.quantiles is not None and fc.quantile_levels:
            lv = fc.quantile_levels
            pos = fc.origins.searchsorted(ctx.times, side="right") - 1
            q = fc.quantiles[np.maximum(pos, 0), 0, :]
            zl, zh = norm.ppf(lv[0]), norm.ppf(lv[-1])
            sq = np.full(len(ctx.bars), np.nan)
            if zl < 0 < zh:
                sq = np.maximum(q[:, 0] / zl, q[:, -1] / zh)
            sq = np.where((pos >= 0) & (sq > 0), sq, s1)
            out["sq"] = sq
        return out

    def sigma(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        ls = self.omega * np.log(feats["s1"]) + (1.0 - self.omega) * np.log(feats["sh"])
        if "sq" in feats:
            ls = (1.0 - self.quantile_weight) * ls + self.quantile_weight * np.log(feats["sq"])
        return np.exp(ls)

    def raw_from(self, feats: Mapping[str, np.ndarray], sigma_ref: float) -> np.ndarray:
        x = self.sigma(feats) / sigma_ref
        raw = np.maximum(self.floor, self.level * x**self.power * (1.0 + self.stress * feats["stress"]))
        if self.release < 1.0:
            raw = slow_release(raw, self.release)
        return raw

    def path(self, ctx: PolicyContext) -> MarginPath:
        feats = self.features(ctx)
        ref = self.sigma_ref
        if ref is None:
            k = ctx.cut_index()
            s = self.sigma(feats)[: max(k, 1)]
            ref = float(np.median(s))
        raw = np.minimum(self.raw_from(feats, ref), 1.0)
        raw_mm = None
        if self.mm_k > 0:
            raw_mm = np.clip(var_to_im(feats["s1"], self.mm_k), self.mm_floor, 1.0)
        elif self.mm_fraction is not None:
            if not 0.0 < self.mm_fraction <= 1.0:
                raise ValueError(f"predictive mm_fraction must be in (0, 1], got {self.mm_fraction!r}")
            raw_mm = self.mm_fraction * np.clip(raw, ctx.controls.floor, ctx.controls.ceiling)
        meta = {**self.params(), "mm_binds": self.mm_binds, "sigma_ref": ref,
                **({"fit": self.fitted} if self.fitted else {})}
        if self.mm_binds == "entry":
            # MM fixed at entry (the MM target of the entry bar): open positions never see an MM change
            cp = apply_controls(raw, ctx.controls, raw_mm)
            return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_target,
                              policy=self.name, meta={**meta, "controls": ctx.controls.to_dict()}, mm_binds="entry",
                              im_requested=raw)
        return mm_controlled(self.name, ctx, raw, meta, raw_mm)


def is_increase_cap(value: Any) -> bool:
    """Whether ``value`` is a usable ``max_im_increase_5d``: a number > 0 (a fraction; bools are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
