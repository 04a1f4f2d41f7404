"""The dynamic portfolio grid under stress: its margin on the isolated-perp population of the cascade engine.

The stress cascade (:mod:`stress.cascade`) margins one linear perp per position with a
:class:`margin.path.MarginPath` (IM for new positions, MM for open ones, per bar). The dynamic grid
(:class:`margin.dynamic_grid.DynamicGridPolicy`) margins a book with the worst loss over a grid of spot moves
``[-r, +r]`` × vol shocks. For a lone linear perp the vol shocks move nothing and the worst spot move is the edge
of the grid, so its grid IM is exactly ``r × notional`` and its MM ``mm_fraction × r × notional``: what
:meth:`margin.dynamic_grid.GridPath.params_at` publishes as the cross-mode rates, and what the portfolio engine
charges a one-perp account (tests/test_margin/test_dynamic_grid.py; tests/test_stress/test_grid.py checks the
rates below against ``compute_margin`` in portfolio mode bar by bar). :class:`GridPerpPolicy` is that reduction: per bar

* ``im_rate = range_new`` (the controlled spot range for books opening at that close),
* ``mm_rate = mm_fraction × range_open`` (the notice-lagged range binding on open books),

with the range ``r = expm1(k × σ(H))`` of the policy's forecast. It is faithful for directional perp books (the
stress population); what it leaves out is what only a multi-instrument book has: the vol shocks (options),
offsets across underlyings and the concentration add-on. Those are measured by the portfolio backtest
(:mod:`backtest.portfolio_backtest`), not here.

The range goes through the stress config's ``controls`` (the same floor, ceiling, cap per update and notice as
every other policy of the comparison), and a budget scale multiplies the raw range before the controls, as
:meth:`margin.dynamic_grid.GridPath.scaled` does in the portfolio headline (:meth:`GridPerpPolicy.with_scale`,
used by :func:`stress.budget.bring_to_budget`); the MM stays ``mm_fraction ×`` the range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from margin.controls import apply_controls
from margin.dynamic_grid import DynamicGridPolicy, GridPath
from margin.path import MarginPath
from margin.policies import PolicyContext
from models.base import VolatilityForecast
from stress.budget import Calibration, bring_to_budget

__all__ = ["GridPerpPolicy", "build_dynamic_grid", "UNDERLYING"]

#: the one underlying of the isolated-perp population
UNDERLYING = "PERP"

#: keys of ``params`` that are this adapter's, not DynamicGridPolicy's
ADAPTER_KEYS = ("sigma",)


@dataclass(frozen=True)
class GridPerpPolicy:
    """A :class:`DynamicGridPolicy` as IM/MM rates of one linear perp (see the module docstring).

    Parameters
    ----------
    grid : DynamicGridPolicy
        The grid policy (its own ``controls`` are replaced by the context's: the comparison's controls).
    scale : float
        Budget scale on the raw spot range (> 0).
    sigma : float, optional
        A constant per-bar forecast volatility (decimal log-return units) instead of the context's forecast: the
        range is then constant and the policy is the static pair ``(r, mm_fraction × r)`` (the check that the
        reduction is the static policy when nothing moves).
    """

    grid: DynamicGridPolicy = field(default_factory=DynamicGridPolicy)
    scale: float = 1.0
    sigma: float | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"dynamic_grid scale must be > 0, got {self.scale!r}")
        if self.sigma is not None and not (np.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"dynamic_grid sigma must be > 0 (per-bar volatility), got {self.sigma!r}")

    @property
    def name(self) -> str:
        return self.grid.name if self.scale == 1.0 else f"{self.grid.name}×{self.scale:.4g}"

    def params(self) -> dict[str, Any]:
        return {**self.grid.params(), "scale": self.scale, "sigma": self.sigma}

    def with_scale(self, factor: float) -> GridPerpPolicy:
        """This policy with its raw spot range multiplied by ``factor`` more."""
        return replace(self, scale=self.scale * float(factor))

    def _context(self, ctx: PolicyContext) -> PolicyContext:
        if self.sigma is None:
            return ctx
        fc = VolatilityForecast(origins=ctx.times, variance=np.full((len(ctx.times), 1), self.sigma ** 2),
                                model="constant")
        return replace(ctx, forecast=fc, regime_probs=None)

    def _unscaled(self, ctx: PolicyContext) -> GridPath:
        # meta["raw_range"]: the range before the controls and the budget scale
        return replace(self.grid, controls=ctx.controls).path({UNDERLYING: self._context(ctx)})

    def grid_path(self, ctx: PolicyContext) -> GridPath:
        """The grid path of the one underlying under the context's controls (scaled)."""
        gp = self._unscaled(ctx)
        return gp if self.scale == 1.0 else gp.scaled(self.scale, ctx.controls)

    def path(self, ctx: PolicyContext) -> MarginPath:
        """IM = the opening range, MM = ``mm_fraction ×`` the notice-lagged range (with the announced MM pending)."""
        raw = np.minimum(np.asarray(self._unscaled(ctx).meta["raw_range"])[:, 0] * self.scale, 0.95)
        # the same controls GridPath applies to the range (mm_fraction=1), with the grid's MM fraction: im_new is
        # range_new and mm_open is mm_fraction × range_open, plus the pending MM the engine's margin calls see
        cp = apply_controls(raw, replace(ctx.controls, mm_fraction=self.grid.mm_fraction))
        return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=self.name,
                          meta={"params": self.params(), "reduction": "isolated linear perp: IM = r, MM = "
                                f"{self.grid.mm_fraction:g} × r"},
                          mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar)


def _grid_kwargs(name: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    valid = {f.name for f in fields(DynamicGridPolicy)} - {"controls", "name"}
    p = dict(params)
    adapter = {k: p.pop(k) for k in ADAPTER_KEYS if k in p}
    unknown = set(p) - valid
    if unknown:
        raise ValueError(f"policy {name!r} (dynamic_grid) has unknown params {sorted(unknown)}; valid: "
                         f"{sorted(valid | set(ADAPTER_KEYS))}")
    return p, adapter


def build_dynamic_grid(spec: Any, cal: Calibration) -> GridPerpPolicy:
    """Builder of the ``dynamic_grid`` kind (:data:`stress.compare.POLICY_KINDS`).

    ``params``: :class:`DynamicGridPolicy` keywords (``k``, ``horizon_bars``, ``mm_fraction``, ...) and ``sigma``.
    With a budget the raw range is first scaled so that its median on the pre-window bars is the budget (where the
    scale search of :func:`stress.budget.bring_to_budget` starts; ``k`` and the scale together set one level,
    the budget's).
    ``fit: {mm_fraction: [...]}``: each MM fraction is brought to the budget on the pre-window run and the one
    with the fewest pre-window liquidations among those with bad debt at most ``budget.bad_debt_tolerance``
    is kept (else the least bad debt), the static envelope's rule; the single-perp reduction has no other free
    shape (vol shocks, offsets and the stress weight do not act on one linear perp).
    """
    kw, adapter = _grid_kwargs(spec.name, spec.params)
    try:
        base = GridPerpPolicy(grid=DynamicGridPolicy(name=spec.name, **kw), **adapter)
    except TypeError as exc:  # pragma: no cover - guarded by _grid_kwargs
        raise ValueError(f"policy {spec.name!r} (dynamic_grid): {exc}") from None
    if cal.budget is not None:
        # start the budget's scale search at the level: the raw range's median on the pre-window bars at the budget
        # (a k set for daily bars is about 20 times too small on 15-minute bars, past the search's bounds)
        raw = base._unscaled(cal.ctx).meta["raw_range"][cal.start:cal.cut, 0]
        base = base.with_scale(cal.budget / float(np.median(raw)))
    if spec.fit is None:
        return base
    fit = dict(spec.fit)
    fracs = fit.pop("mm_fraction", None)
    if fit or not isinstance(fracs, list | tuple) or not fracs:
        raise ValueError(f"policy {spec.name!r} (dynamic_grid): fit takes one key, mm_fraction (a non-empty list), "
                         f"got {dict(spec.fit)!r}")
    if cal.budget is None:
        raise ValueError(f"policy {spec.name!r} (dynamic_grid): fit needs a top-level budget")
    tol = cal.settings.bad_debt_tolerance
    best: tuple[tuple[Any, ...], GridPerpPolicy] | None = None
    for f in fracs:
        pol, rec = bring_to_budget(replace(base, grid=replace(base.grid, mm_fraction=float(f))), cal)
        ok = rec["pre_window_bad_debt"] <= tol
        key = ((0, rec["pre_window_liquidations"], rec["pre_window_bad_debt"]) if ok
               else (1, rec["pre_window_bad_debt"], rec["pre_window_liquidations"]))
        if best is None or key < best[0]:
            best = (key, pol)
    assert best is not None
    return best[1]
