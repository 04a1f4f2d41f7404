"""Frontiers of liquidations and bad debt against average collateral, and comparisons at equal collateral.

* :func:`sweep` runs a policy family over scales (static IM levels, the bound's multipliers, ...) and
  collects ``(avg_collateral, liquidations, bad_debt)`` points.
* :func:`interpolate` reads a frontier at a given average collateral: the frontier is made monotone (the
  lower envelope: at collateral ``c``, the best metric among points with collateral ``<= c``), then
  interpolated linearly; outside the frontier's collateral range the value is ``None`` with a reason.
* :func:`compare` gives a policy's change against the best static at its own collateral (fractions;
  negative is fewer) and the share of the bound's change it captures; a ratio whose denominator is zero
  is ``None`` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["FrontierPoint", "Frontier", "Interpolated", "sweep", "frontier_from_results", "interpolate", "refine",
           "compare"]

Metric = Literal["liquidations", "bad_debt"]
METRICS: tuple[str, ...] = ("liquidations", "bad_debt")


@dataclass(frozen=True)
class FrontierPoint:
    """One point: the scale that produced it and its outcomes."""

    scale: float
    avg_collateral: float
    liquidations: float
    bad_debt: float
    policy: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "avg_collateral": self.avg_collateral, "liquidations": self.liquidations,
                "bad_debt": self.bad_debt, "policy": self.policy}


@dataclass(frozen=True)
class Frontier:
    """Points of one policy family, sorted by ``avg_collateral``."""

    family: str
    points: tuple[FrontierPoint, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pts = tuple(sorted((p for p in self.points if math.isfinite(p.avg_collateral)),
                           key=lambda p: (p.avg_collateral, p.scale)))
        object.__setattr__(self, "points", pts)

    def arrays(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        x = np.array([p.avg_collateral for p in self.points], dtype=np.float64)
        y = np.array([getattr(p, metric) for p in self.points], dtype=np.float64)
        return x, y

    def envelope(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Monotone lower envelope: the best ``metric`` among points with collateral ``<=`` each point's."""
        x, y = self.arrays(metric)
        return x, np.minimum.accumulate(y) if y.size else y

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "points": [p.to_dict() for p in self.points], "meta": self.meta}


@dataclass(frozen=True)
class Interpolated:
    """A value read off a frontier, or ``None`` with the reason."""

    value: float | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason}


def _point(scale: float, res: Any) -> FrontierPoint:
    return FrontierPoint(scale=float(scale), avg_collateral=float(res.avg_collateral),
                         liquidations=float(res.liquidations), bad_debt=float(res.bad_debt),
                         policy=str(getattr(res, "policy", "")))


def sweep(family: str, scales: Iterable[float], run_fn: Callable[[float], Any]) -> Frontier:
    """Run ``run_fn(scale) -> BacktestResult`` for each scale and collect the frontier."""
    pts = [_point(s, run_fn(s)) for s in scales]
    if not pts:
        raise ValueError(f"sweep of {family!r} needs at least one scale")
    return Frontier(family=family, points=tuple(pts))


def frontier_from_results(family: str, results: Sequence[Any] | Mapping[float, Any]) -> Frontier:
    """Frontier from backtest results already computed (scales: mapping keys or positions)."""
    items = results.items() if isinstance(results, Mapping) else enumerate(results)
    return Frontier(family=family, points=tuple(_point(s, r) for s, r in items))


def interpolate(frontier: Frontier, avg_collateral: float, metric: str, *, extend_right: bool = False) -> Interpolated:
    """The frontier's ``metric`` at ``avg_collateral`` (monotone lower envelope, linear in between).

    ``extend_right``: above the largest collateral, return the envelope's last value (valid for the bound,
    whose envelope is "the best achievable with at most this collateral"); otherwise ``None``.
    """
    x, y = frontier.envelope(metric)
    c = float(avg_collateral)
    if x.size == 0:
        return Interpolated(None, f"frontier {frontier.family!r} has no points")
    if not math.isfinite(c):
        return Interpolated(None, f"avg_collateral is {c}")
    tol = 1e-12 * max(1.0, abs(x[-1]))
    if extend_right and c > x[-1]:
        return Interpolated(float(y[-1]), None)
    if c < x[0] - tol or c > x[-1] + tol:
        return Interpolated(None, f"avg_collateral {c:.6g} outside the {frontier.family} frontier's range "
                                  f"[{x[0]:.6g}, {x[-1]:.6g}]")
    c = min(max(c, x[0]), x[-1])
    # np.interp needs increasing x; equal x keep the envelope's (lowest) value
    xu = np.unique(x)
    last = np.searchsorted(x, xu, side="right") - 1
    return Interpolated(float(np.interp(c, xu, y[last])), None)


def refine(frontier: Frontier, avg_collateral: float, run_fn: Callable[[float], Any], *, rel_tol: float = 2e-3,
           max_iter: int = 14) -> Frontier:
    """Add points to a frontier around ``avg_collateral`` by bisecting the scale (geometric mean).

    A frontier of liquidations or bad debt against collateral is typically convex, so a straight line between
    two distant grid points lies ABOVE it and flatters any policy compared with it. ``refine`` runs the family
    at scales between the two points bracketing ``avg_collateral`` (collateral must grow with the scale, as
    for static IM levels) until the bracket is narrower than ``rel_tol × avg_collateral``; the returned
    frontier holds every evaluated point. Outside the frontier's range it is returned unchanged.
    """
    c = float(avg_collateral)
    pts = list(frontier.points)
    for _ in range(max_iter):
        x = np.array([p.avg_collateral for p in pts])
        order = np.argsort(x)
        xs = x[order]
        if not math.isfinite(c) or xs.size < 2 or c < xs[0] or c > xs[-1]:
            break
        i = int(np.searchsorted(xs, c, side="left"))
        if xs[min(i, xs.size - 1)] == c:
            break
        lo, hi = pts[order[i - 1]], pts[order[i]]
        if hi.avg_collateral - lo.avg_collateral <= rel_tol * c or lo.scale <= 0 or hi.scale <= 0:
            break
        mid = math.sqrt(lo.scale * hi.scale)
        if mid in (lo.scale, hi.scale):
            break
        pts.append(_point(mid, run_fn(mid)))
    return Frontier(family=frontier.family, points=tuple(pts), meta={**frontier.meta, "refined_at": c})


def _rel_change(value: float, ref: Interpolated, what: str) -> tuple[float | None, str | None]:
    if ref.value is None:
        return None, ref.reason
    if ref.value == 0:
        return None, f"best static {what} is 0 at this collateral (relative change undefined)"
    return (value - ref.value) / ref.value, None


def _bracket(frontier: Frontier, c: float) -> list[float] | None:
    x = np.array([p.avg_collateral for p in frontier.points])
    if x.size == 0 or not math.isfinite(c) or c < x[0] or c > x[-1]:
        return None
    i = int(np.searchsorted(x, c, side="left"))
    return [float(x[max(i - 1, 0)] if x[i] != c else c), float(x[i])]


def compare(result: Any, static_frontier: Frontier, bound_results: Mapping[str, Any] | None = None, *,
            run_static: Callable[[float], Any] | None = None) -> dict[str, Any]:
    """Compare a policy with the best static at its own average collateral, and with the bound.

    Pass ``run_static`` (static IM level -> result, in the same setting as ``result``) to :func:`refine` the
    static frontier at the policy's collateral first: linear interpolation between distant static levels
    lies above a convex frontier and would credit the policy with a gain it does not have.

    Parameters
    ----------
    result : BacktestResult (or anything with avg_collateral, liquidations, bad_debt)
        The policy's outcome.
    static_frontier : Frontier
        The static family's frontier (scored in the same setting as ``result``).
    bound_results : mapping, optional
        ``{"liquidations": ..., "bad_debt": ...}``: the bound run for each objective, as a
        :class:`Frontier` (read at the policy's collateral; above the bound's largest collateral its best
        value holds) or a single result (compared at its own collateral).

    Returns
    -------
    dict
        ``liquidations_change``, ``bad_debt_change`` (fractions at equal collateral; negative is fewer),
        ``share_of_bound_liquidations``, ``share_of_bound_bad_debt`` (policy change / bound change, both
        against the best static), ``best_static_liquidations``, ``best_static_bad_debt``,
        ``avg_collateral``, ``static_bracket`` (collateral of the static points interpolated between), and
        ``reason`` / ``reasons`` for every ``None``.
    """
    c = float(result.avg_collateral)
    if run_static is not None:
        static_frontier = refine(static_frontier, c, run_static)
    out: dict[str, Any] = {"avg_collateral": c, "static_bracket": _bracket(static_frontier, c)}
    reasons: dict[str, str] = {}
    for metric in METRICS:
        ref = interpolate(static_frontier, c, metric)
        value = float(getattr(result, metric))
        out[f"best_static_{metric}"] = ref.value
        ch, why = _rel_change(value, ref, metric)
        out[f"{metric}_change"] = ch
        if why:
            reasons[f"{metric}_change"] = why
        key = f"share_of_bound_{metric}"
        share: float | None = None
        b = None if bound_results is None else bound_results.get(metric)
        if b is None:
            reasons[key] = f"no bound result for {metric}"
        elif ch is None:
            reasons[key] = why or "policy change undefined"
        elif isinstance(b, Frontier):
            bref = interpolate(b, c, metric, extend_right=True)
            if bref.value is None:
                reasons[key] = f"bound: {bref.reason}"
            else:
                denom = bref.value - float(ref.value)  # type: ignore[arg-type]
                if denom == 0:
                    reasons[key] = f"the bound does not change {metric} against the best static at this collateral"
                else:
                    share = (value - float(ref.value)) / denom  # type: ignore[arg-type]
        else:
            bref = interpolate(static_frontier, float(b.avg_collateral), metric)
            bch, bwhy = _rel_change(float(getattr(b, metric)), bref, metric)
            if bch is None:
                reasons[key] = f"bound: {bwhy}"
            elif bch == 0:
                reasons[key] = f"the bound does not change {metric} against the best static"
            else:
                share = ch / bch
        out[key] = share
    out["reasons"] = reasons
    out["reason"] = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or None
    return out
