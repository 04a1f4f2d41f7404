"""Controls on one feed update and the failsafe: from a policy's raw proposal and the previous record to the rates
that are published.

Everything is decided in the integer units the record is signed in (``10**-8``; :data:`serving.feed.EXPO`), so
that the consumer contract (serving/contracts/MarginFeedConsumer.sol) can check the same caps exactly.

Rules for a normal update (the same as :mod:`margin.controls`, applied against the last *published* record):

* IM is clipped to ``[floor, ceiling]`` and then to ``[(1 - max_change) IM_prev, (1 + max_change) IM_prev]``;
* the MM target is ``mm_fraction × IM`` (or the policy's own MM), at most IM and capped the same way;
* an MM *increase* never binds at once: it is published as ``mm_rate_pending`` with ``mm_effective_from`` at
  least ``notice`` seconds later (a pending level that is lowered keeps its date; raised, it gets new notice);
  when that time has passed the pending rate is the binding one; decreases bind at once, capped;
* a normal update comes at least ``min_interval`` seconds after the previous one.

The failsafe replaces the proposal when the model cannot load, the input is stale, or a value is non-finite or
out of bounds: IM becomes ``max(static IM, (1 + buffer) × last good IM, previous IM)`` and may rise at once (no
upper change cap), the MM follows the notice rule, and decreases stay capped. The record says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.feed import SCALE, to_units

__all__ = ["UpdateRules", "Proposal", "PrevRates", "Decision", "decide_update", "check_update"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class UpdateRules:
    """Change controls and failsafe settings of one market.

    Parameters
    ----------
    floor, ceiling : float
        IM bounds (fractions of notional), ``0 < floor <= ceiling <= 1``.
    max_change : float
        Largest relative change of IM (and MM) per update, > 0 (0.25 = ±25 %).
    notice_s : int
        Seconds between the announcement of an MM increase and the time it binds (>= 0).
    min_interval_s : int
        Least seconds between two normal updates (>= 0; fallbacks may come at any time).
    mm_fraction : float
        MM target as a fraction of IM, in (0, 1].
    static_im : float
        IM of the market's static policy: the failsafe never publishes less.
    static_mm : float
        MM of the static policy (default ``mm_fraction × static_im``).
    fallback_buffer : float
        A fallback IM is at least ``(1 + fallback_buffer) ×`` the last good IM (>= 0).
    sanity_min, sanity_max : float
        A raw policy IM outside ``[sanity_min, sanity_max]`` is treated as a failure (fallback).
    """

    floor: float = 0.02
    ceiling: float = 0.5
    max_change: float = 0.25
    notice_s: int = 3600
    min_interval_s: int = 60
    mm_fraction: float = 0.5
    static_im: float = 0.10
    static_mm: float | None = None
    fallback_buffer: float = 0.25
    sanity_min: float = 1e-4
    sanity_max: float = 1.0

    def __post_init__(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"controls.{name} must be a finite number, got {v!r}")
            return float(v)

        if not 0.0 < num("floor") <= 1.0:
            raise ValueError(f"controls.floor must be in (0, 1], got {self.floor!r}")
        if not self.floor <= num("ceiling") <= 1.0:
            raise ValueError(f"controls.ceiling must be in [floor={self.floor}, 1], got {self.ceiling!r}")
        if not 0.0 < num("max_change") < 1.0:
            raise ValueError(f"controls.max_change must be in (0, 1), got {self.max_change!r}")
        for name in ("notice_s", "min_interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"controls.{name} must be an integer number of seconds >= 0, got {v!r}")
        if not 0.0 < num("mm_fraction") <= 1.0:
            raise ValueError(f"controls.mm_fraction must be in (0, 1], got {self.mm_fraction!r}")
        if not 0.0 < num("static_im") <= 1.0:
            raise ValueError(f"failsafe.static_im must be in (0, 1], got {self.static_im!r}")
        if self.static_mm is not None and not 0.0 < float(self.static_mm) <= self.static_im:
            raise ValueError(f"failsafe.static_mm must be in (0, static_im={self.static_im}], got {self.static_mm!r}")
        if num("fallback_buffer") < 0.0:
            raise ValueError(f"failsafe.fallback_buffer must be >= 0, got {self.fallback_buffer!r}")
        if not 0.0 < num("sanity_min") < num("sanity_max") <= 1.0:
            raise ValueError(
                f"failsafe.sanity_min/sanity_max must satisfy 0 < min < max <= 1, got {self.sanity_min!r}, {self.sanity_max!r}"
            )

    @property
    def max_change_units(self) -> int:
        """``max_change`` in units of ``10**-8`` (what the contract is configured with)."""
        return to_units(self.max_change, "controls.max_change")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class PrevRates:
    """The previous record's rates (integer units) and times (UNIX seconds)."""

    update_id: int
    im: int
    mm: int
    mm_pending: int  # 0: none
    mm_effective_from: int  # 0: none
    valid_from: int
    fallback: bool

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> PrevRates:
        return cls(update_id=int(msg["updateId"]), im=int(msg["imRate"]), mm=int(msg["mmRate"]),
                   mm_pending=int(msg["mmRatePending"]), mm_effective_from=int(msg["mmEffectiveFrom"]),
                   valid_from=int(msg["validFrom"]), fallback=bool(msg["fallback"]))

    def mm_now(self, t: int) -> int:
        """MM binding at time ``t``: the pending rate once its effective time has come."""
        if self.mm_pending and self.mm_effective_from <= t:
            return self.mm_pending
        return self.mm


@dataclass(frozen=True, slots=True)
class Proposal:
    """A policy's raw output (fractions; may be non-finite: the failsafe catches it) or a failure reason."""

    im: float
    mm: float | None = None
    failure: str | None = None


@dataclass(frozen=True)
class Decision:
    """Rates to publish (integer units) and why they differ from the proposal."""

    im: int
    mm: int
    mm_pending: int
    mm_effective_from: int
    fallback: bool
    reason: str | None
    adjustments: tuple[str, ...] = field(default_factory=tuple)
    skip: str | None = None  # set when nothing should be published (min interval)


def _finite_pos(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def decide_update(
    proposal: Proposal,
    rules: UpdateRules,
    now: int,
    prev: PrevRates | None = None,
    last_good: PrevRates | None = None,
) -> Decision:
    """Apply the failsafe and the change controls to a proposal (see the module docstring).

    Parameters
    ----------
    proposal : Proposal
        Raw IM/MM of the policy, or a failure reason (model missing, stale input ...).
    rules : UpdateRules
    now : int
        Publishing time (UNIX seconds, UTC); becomes ``validFrom``.
    prev : PrevRates, optional
        The current record of the market.
    last_good : PrevRates, optional
        The last record that was not a fallback.

    Returns
    -------
    Decision
    """
    adj: list[str] = []
    reason = proposal.failure
    if reason is None:
        im_raw, mm_raw = proposal.im, proposal.mm
        if not _finite_pos(im_raw) or not rules.sanity_min <= float(im_raw) <= rules.sanity_max:
            reason = (f"policy IM {im_raw!r} is non-finite or outside the sanity bounds "
                      f"[{rules.sanity_min}, {rules.sanity_max}]")
        elif mm_raw is not None and (not _finite_pos(mm_raw) or float(mm_raw) > float(im_raw) * (1 + 1e-9)):
            reason = f"policy MM {mm_raw!r} is non-finite, not positive or above its IM {im_raw!r}"
    fallback = reason is not None
    if prev is not None and not fallback and now - prev.valid_from < rules.min_interval_s:
        return Decision(prev.im, prev.mm, prev.mm_pending, prev.mm_effective_from, False, None, (),
                        skip=f"last update {now - prev.valid_from}s ago, minimum interval {rules.min_interval_s}s")
    static_mm = rules.static_mm if rules.static_mm is not None else rules.mm_fraction * rules.static_im
    if fallback:
        im_t = max(rules.static_im, (1 + rules.fallback_buffer) * (last_good.im / SCALE if last_good else 0.0),
                   prev.im / SCALE if prev else 0.0)
        im_t = min(im_t, 1.0)
        mm_t = max(static_mm, rules.mm_fraction * im_t, last_good.mm / SCALE if last_good else 0.0)
        adj.append("failsafe")
    else:
        im_t = min(max(float(proposal.im), rules.floor), rules.ceiling)
        if im_t != float(proposal.im):
            adj.append("im floor/ceiling")
        mm_t = rules.mm_fraction * im_t if proposal.mm is None else max(float(proposal.mm), rules.mm_fraction * rules.floor)
    im = to_units(im_t, "im")
    mc = rules.max_change_units
    if prev is not None:
        lo = _ceil_div(prev.im * (SCALE - mc), SCALE)
        hi = SCALE if fallback else min(SCALE, (prev.im * (SCALE + mc)) // SCALE)
        capped = min(max(im, lo), hi)
        if capped != im:
            adj.append("im change cap")
        im = capped
    im = max(im, 1)
    mm_target = min(to_units(min(mm_t, 1.0), "mm"), im)
    if prev is None:
        return Decision(im, max(mm_target, 1), 0, 0, fallback, reason, tuple(adj))
    mm_now = prev.mm_now(now)
    pending, eff = 0, 0
    if mm_target <= mm_now:
        lo = _ceil_div(mm_now * (SCALE - mc), SCALE)
        mm = max(mm_target, lo)
        if mm != mm_target:
            adj.append("mm change cap")
    elif rules.notice_s == 0:
        hi = mm_target if fallback else (mm_now * (SCALE + mc)) // SCALE
        mm = min(mm_target, hi)
        if mm != mm_target:
            adj.append("mm change cap")
    else:
        mm = mm_now
        target = mm_target if fallback else min(mm_target, (mm_now * (SCALE + mc)) // SCALE)
        if target != mm_target:
            adj.append("mm change cap")
        if target > mm:
            pending = target
            carried = prev.mm_pending and prev.mm_effective_from > now and target <= prev.mm_pending
            eff = prev.mm_effective_from if carried else now + rules.notice_s
            adj.append("mm notice")
    if mm > im:
        mm = im  # IM fell below the binding MM: MM follows IM down (a decrease, allowed at once)
        adj.append("mm at most im")
    if pending and pending <= mm:
        pending, eff = 0, 0
    return Decision(im, max(mm, 1), pending, eff, fallback, reason, tuple(adj))


def check_update(
    msg: Mapping[str, Any], prev: PrevRates | None, rules: UpdateRules, *, now: int | None = None
) -> list[str]:
    """The consumer's checks of a new record's message against the previous one (what the contract enforces).

    Returns the list of violated rules (empty when the update is acceptable). Used in tests to show that every
    record :func:`decide_update` produces passes, and by ``volmargin watch``.
    """
    bad: list[str] = []
    im, mm, pend, eff = int(msg["imRate"]), int(msg["mmRate"]), int(msg["mmRatePending"]), int(msg["mmEffectiveFrom"])
    vf, vu, fb = int(msg["validFrom"]), int(msg["validUntil"]), bool(msg["fallback"])
    if int(msg["expo"]) != -8:
        bad.append(f"expo {msg['expo']} != -8")
    if not 0 < mm <= im <= SCALE:
        bad.append(f"rates must satisfy 0 < mmRate <= imRate <= 1e8, got mmRate={mm}, imRate={im}")
    if pend and not mm < pend <= im:
        bad.append(f"mmRatePending {pend} must be in (mmRate={mm}, imRate={im}]")
    if (pend == 0) != (eff == 0):
        bad.append("mmRatePending and mmEffectiveFrom must be set together")
    if vu <= vf:
        bad.append(f"validUntil {vu} must be after validFrom {vf}")
    if now is not None and not vf <= now < vu:
        bad.append(f"record not valid at {now}: [{vf}, {vu})")
    if prev is None:
        return bad
    mc = rules.max_change_units
    if int(msg["updateId"]) <= prev.update_id:
        bad.append(f"updateId {msg['updateId']} not above {prev.update_id} (replay)")
    if vf < prev.valid_from + (0 if fb else rules.min_interval_s):
        bad.append(f"validFrom {vf} too soon after {prev.valid_from}")
    if im * SCALE < prev.im * (SCALE - mc):
        bad.append(f"imRate {im} falls more than the cap below {prev.im}")
    if not fb and im * SCALE > prev.im * (SCALE + mc):
        bad.append(f"imRate {im} rises more than the cap above {prev.im}")
    mm_now = prev.mm_now(vf)
    if mm > mm_now and (rules.notice_s > 0 or (not fb and mm * SCALE > mm_now * (SCALE + mc))):
        bad.append(f"mmRate {mm} rises above the binding {mm_now} without notice")
    if mm < mm_now and mm != im and mm * SCALE < mm_now * (SCALE - mc):
        bad.append(f"mmRate {mm} falls more than the cap below {mm_now}")
    if pend:
        carried = prev.mm_pending and eff == prev.mm_effective_from and prev.mm_effective_from > vf and pend <= prev.mm_pending
        if not carried and eff < vf + rules.notice_s:
            bad.append(f"mmEffectiveFrom {eff} gives less than {rules.notice_s}s notice after {vf}")
        if not fb and pend * SCALE > mm_now * (SCALE + mc):
            bad.append(f"mmRatePending {pend} rises more than the cap above {mm_now}")
    return bad
