"""Publishing one market: latest bars → pinned model's forecast → the market's policy → controls and failsafe →
a signed record stored atomically.

:func:`compute_proposal` does the slow part (data, model, policy) outside any lock and never raises for a
failure of the data or the model: it returns a :class:`Computed` whose ``proposal`` carries the failure reason,
so that :func:`publish_market` publishes the failsafe's conservative parameters instead. :func:`publish_market`
then decides the rates against the current record inside the store's write transaction, builds the whole
``MarginParams`` (tiers, haircuts, the dynamic scenario grid), signs and stores it. A crash anywhere before the
store's ``COMMIT`` leaves the previous record current.

``as_of`` replays history: only bars up to it are used and its date goes into the lineage, while the validity
window is stamped at publishing time (``now``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from margin.params import MarginParams, RiskTier, ScenarioGrid
from serving.failsafe import Decision, PrevRates, Proposal, decide_update
from serving.feed import FeedRecord, from_units, sign_record
from serving.forecast import ModelUnavailable, model_forecast
from serving.markets import MarketCfg, MarketsFile
from serving.store import FeedStore, StoredRecord

__all__ = ["Computed", "PublishResult", "compute_proposal", "publish_market", "load_market_data", "code_version",
           "market_policy", "build_params"]

log = logging.getLogger(__name__)

_DATA: dict[tuple[str, float], Any] = {}  # (input, mtime) -> PreparedData, per process


def code_version() -> str:
    """``volmargin`` package version plus the git commit when running from a checkout (read-only)."""
    try:
        ver = metadata.version("volmargin")
    except metadata.PackageNotFoundError:  # pragma: no cover
        ver = "unknown"
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{ver}+g{ref[:12]}"
    except OSError:
        return ver


def _utc(t: Any) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")


def load_market_data(source: str) -> Any:
    """``data_pipelines.pipeline.prepare_dataset(source)``, cached per process (files: until they change)."""
    from data_pipelines.pipeline import prepare_dataset

    path = source.split(":", 1)[1] if source.split(":", 1)[0] in ("csv", "parquet", "file") else source
    try:
        mtime = os.stat(path).st_mtime if os.path.exists(path) else 0.0
    except OSError:
        mtime = 0.0
    key = (source, mtime)
    if key not in _DATA:
        _DATA[key] = prepare_dataset(source, policy="repair")
    return _DATA[key]


@dataclass(frozen=True)
class Computed:
    """What the market's model and policy propose (or why they could not)."""

    proposal: Proposal
    forecast: dict[str, Any]
    lineage: dict[str, Any]
    sigma_h: float | None = None
    adjustments: tuple[str, ...] = field(default_factory=tuple)
    grid: dict[str, Any] | None = None  # the dynamic_grid policy's scenario grid (scenario_grid.source)


def market_policy(name: str, params: dict[str, Any]) -> Any:
    """A deployable margin policy of :mod:`margin.policies` by name (``static_<im>``, ``ewma_ccp``, ``garch_fhs``).

    Raises
    ------
    ValueError
        Unknown name or a bad parameter (named).
    """
    from margin.policies import EwmaCcpPolicy, GarchFhsPolicy, StaticPolicy

    try:
        if name.startswith("static_"):
            try:
                im = float(name[len("static_"):])
            except ValueError:
                raise ValueError(f"policy.name must be static_<im> with im a number, got {name!r}") from None
            return StaticPolicy(im=im, **params)
        if name == "ewma_ccp":
            return EwmaCcpPolicy(**params)
        if name == "garch_fhs":
            return GarchFhsPolicy(**params)
    except TypeError as exc:
        raise ValueError(f"policy.params of {name}: {exc}") from None
    raise ValueError(f"policy.name must be static_<im>, ewma_ccp, garch_fhs or predictive, got {name!r}")


def _policy_raw(mcfg: MarketCfg, bars: pd.DataFrame, forecast: Any, mm_fraction: float, cache_dir: str, *,
                market: str | None = None, history: pd.DataFrame | None = None, tracking_uri: str | None = None,
                model_version: str | None = None) -> tuple[float, float, dict[str, Any] | None]:
    """Raw IM and MM of the market's policy at the last bar (controls relaxed: the feed applies its own), and,
    for ``predictive``, where its parameters came from (a fit on ``history`` before ``bars`` when needed)."""
    from margin.controls import Controls
    from margin.policies import PolicyContext

    relaxed = Controls(floor=1e-6, ceiling=1.0, max_change=1e6, notice_bars=0, mm_fraction=mm_fraction)
    ctx = PolicyContext(bars=bars, forecast=forecast, controls=relaxed)
    name = mcfg.policy.name
    params = dict(mcfg.policy.params)
    info = None
    if name == "predictive":
        from serving.predictive import predictive_policy

        policy, info = predictive_policy(mcfg, params, ctx, cache_dir, market=market, history=history,
                                         tracking_uri=tracking_uri, model_version=model_version)
    else:
        policy = market_policy(name, params)
    path = policy.path(ctx)
    im = float(path.im_rate[-1])
    mm_target = path.mm_pending[-1] if path.mm_pending is not None and np.isfinite(path.mm_pending[-1]) else path.mm_rate[-1]
    return im, float(mm_target), info


def compute_proposal(
    markets: MarketsFile,
    market_id: str,
    *,
    as_of: datetime | None = None,
    now: datetime | None = None,
    tracking_uri: str | None = None,
) -> Computed:
    """Data, model and policy of one market → a :class:`Computed` (failures become a failure reason).

    Parameters
    ----------
    markets : MarketsFile
    market_id : str
    as_of : datetime, optional
        Use bars up to this UTC time (replay); default all bars.
    now : datetime, optional
        Wall-clock time for the staleness check when ``as_of`` is not given.
    tracking_uri : str, optional
        MLflow URI (default: ``feed.tracking_uri``, ``$MLFLOW_TRACKING_URI``, ``sqlite:///mlruns.db``).
    """
    from training.tracking import resolve_tracking_uri

    mcfg = markets.market(market_id)
    rules = mcfg.rules()
    uri = resolve_tracking_uri(tracking_uri or markets.feed.tracking_uri)
    lineage: dict[str, Any] = {
        "market": market_id,
        "data_source": mcfg.input,
        "as_of": None if as_of is None else _utc(as_of).isoformat().replace("+00:00", "Z"),
        "code_version": code_version(),
        "config_hash": markets.config_hash(market_id),
        "policy": {"name": mcfg.policy.name, "params": dict(mcfg.policy.params), "fitted_from": mcfg.policy.fitted_from},
        "model_name": mcfg.model.name, "model_alias": mcfg.model.alias if not mcfg.model.version else None,
        "model_version": mcfg.model.version, "model_source": None, "data_hash": None, "last_bar": None,
    }
    empty_fc: dict[str, Any] = {"model": None, "version": None, "origin": None, "horizon": mcfg.model.horizon,
                                "variance": None, "sigma_1": None, "sigma_h": None, "raw_im": None, "raw_mm": None}

    def fail(reason: str) -> Computed:
        log.warning("%s: %s", market_id, reason)
        return Computed(Proposal(im=float("nan"), failure=reason), empty_fc, lineage)

    try:
        data = load_market_data(mcfg.input)
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"input {mcfg.input} unavailable: {exc}")
    feats = data.features.copy()
    idx = pd.DatetimeIndex(feats.index)
    feats.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
    if as_of is not None:
        feats = feats[feats.index <= _utc(as_of)]
    if len(feats) == 0:
        return fail(f"input {mcfg.input} has no bars up to {lineage['as_of']}")
    from data_pipelines.bars import content_hash

    bars = feats[["open", "high", "low", "close", "volume"]]
    lineage["data_hash"] = content_hash(bars)
    lineage["last_bar"] = feats.index[-1].isoformat().replace("+00:00", "Z")
    clock = _utc(as_of) if as_of is not None else _utc(now or datetime.now(UTC))
    age_max = mcfg.max_input_age_s
    if age_max is not None and (clock - feats.index[-1]).total_seconds() > age_max:
        age = clock - feats.index[-1]
        return fail(f"input stale: last bar {lineage['last_bar']} is {age} old at {clock.isoformat()} "
                    f"(failsafe.max_input_age {mcfg.failsafe.max_input_age})")
    grid = None
    if mcfg.scenario_grid is not None and mcfg.scenario_grid.dynamic and mcfg.scenario_grid.source == "dynamic_grid":
        try:
            grid = _dynamic_grid(mcfg, feats.index[-1], lineage)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return fail(f"dynamic grid unavailable: {exc}")
    try:
        mf = model_forecast(market_id, mcfg.model, feats, tracking_uri=uri, cache_dir=markets.feed.cache_dir)
    except ModelUnavailable as exc:
        return fail(f"model cannot load: {exc}")
    lineage.update({k: v for k, v in mf.lineage.items() if k != "spec"}, model_spec=mf.lineage.get("spec"))
    fc = mf.forecast
    var_last = fc.variance[-1]
    sigma_h = float(math.sqrt(float(var_last.sum())))
    forecast = {"model": fc.model, "version": fc.version, "origin": fc.origins[-1].isoformat().replace("+00:00", "Z"),
                "horizon": fc.horizon, "variance": [float(v) for v in var_last], "sigma_1": float(math.sqrt(var_last[0])),
                "sigma_h": sigma_h, "raw_im": None, "raw_mm": None}
    win = bars[bars.index >= fc.origins[0]]
    try:
        im, mm, fit_info = _policy_raw(mcfg, win, fc, rules.mm_fraction, markets.feed.cache_dir, market=market_id,
                                       history=feats, tracking_uri=uri, model_version=lineage.get("model_version"))
    except (ValueError, TypeError, ZeroDivisionError, FloatingPointError, KeyError, OSError) as exc:
        return Computed(Proposal(im=float("nan"), failure=f"policy {mcfg.policy.name} failed: {exc}"), forecast, lineage,
                        sigma_h)
    forecast.update(raw_im=im if math.isfinite(im) else None, raw_mm=mm if math.isfinite(mm) else None)
    if fit_info is not None:
        lineage["policy"]["fit"] = fit_info
    return Computed(Proposal(im=im, mm=mm), forecast, lineage, sigma_h, grid=grid)


def _dynamic_grid(mcfg: MarketCfg, last_bar: pd.Timestamp, lineage: dict[str, Any]) -> dict[str, Any]:
    """The scenario grid the ``dynamic_grid`` policy of a run (``scenario_grid.params_from``) set for this market's
    underlying at ``last_bar`` (the grid in force for open positions, as ``volmargin margin --params-from``)."""
    from margin.dynamic_grid import GridPath

    g = mcfg.scenario_grid
    if g is None or g.params_from is None:
        raise ValueError("scenario_grid.params_from is not set")
    src = Path(g.params_from)
    path = src / "portfolio_grid.json" if src.is_dir() else src
    if not path.is_file():
        raise FileNotFoundError(f"scenario_grid.params_from: no portfolio_grid.json at {path}")
    gp = GridPath.read(path)
    if mcfg.underlying not in gp.underlyings:
        raise ValueError(f"{path} has no grid for underlying {mcfg.underlying!r} (it has {list(gp.underlyings)})")
    i = gp.index_at(last_bar)
    at = gp.times[i]
    age_max = mcfg.max_input_age_s
    if age_max is not None and (last_bar - at).total_seconds() > age_max:
        raise ValueError(f"its last grid ({at.isoformat()}) is older than failsafe.max_input_age "
                         f"{mcfg.failsafe.max_input_age} at the last bar {last_bar.isoformat()}")
    sg = gp.grid(i, list(gp.underlyings).index(mcfg.underlying)).to_dict()
    lineage["scenario_grid"] = {"source": "dynamic_grid", "file": str(path), "bar": at.isoformat().replace("+00:00", "Z"),
                                "spot_range": max(abs(x) for x in sg["spot_shocks"])}
    return sg


def _grid(mcfg: MarketCfg, base: dict[str, Any], sigma_h: float | None, prev_grid: dict[str, Any] | None,
          policy_grid: dict[str, Any] | None = None) -> dict[str, Any]:
    g = mcfg.scenario_grid
    sg = dict(base.get("scenario_grid") or ScenarioGrid().to_dict())
    if g is None or not g.dynamic:
        return sg
    if g.source == "dynamic_grid" and policy_grid is not None:
        return dict(policy_grid)
    if sigma_h is None or not math.isfinite(sigma_h) or g.source == "dynamic_grid":
        if prev_grid is not None:  # fallback: keep the last grid, never narrow it
            return dict(prev_grid)
        s = g.max_shock
    else:
        s = min(max(g.sigmas * sigma_h, g.min_shock), g.max_shock)
    sg["spot_shocks"] = [round(float(x), 10) for x in np.linspace(-s, s, g.points)]
    sg["vol_shocks"] = list(g.vol_shocks)
    return sg


def build_params(mcfg: MarketCfg, d: Decision, now_s: int, sigma_h: float | None,
                 prev_doc: StoredRecord | None, policy_grid: dict[str, Any] | None = None) -> MarginParams:
    """The whole ``MarginParams`` of a decision: base fields, tiers, pending MM, dynamic grid, validity."""
    base = dict(mcfg.params)
    im, mm = from_units(d.im), from_units(d.mm)
    kw: dict[str, Any] = {**base, "market_id": mcfg.underlying}
    if mcfg.tiers:
        kw["tiers"] = tuple(
            RiskTier(max_notional=math.inf if t.max_notional is None else t.max_notional,
                     im_rate=min(1.0, im * t.multiplier), mm_rate=min(min(1.0, im * t.multiplier), mm * t.multiplier))
            for t in mcfg.tiers
        )
    else:
        kw.update(im_rate=im, mm_rate=mm)
    if d.mm_pending:
        kw.update(mm_rate_pending=from_units(d.mm_pending),
                  mm_effective_from=datetime.fromtimestamp(d.mm_effective_from, UTC))
    prev_grid = prev_doc["params"].get("scenario_grid") if prev_doc is not None else None
    kw["scenario_grid"] = _grid(mcfg, base, sigma_h, prev_grid, policy_grid)
    kw["valid_from"] = datetime.fromtimestamp(now_s, UTC)
    kw["valid_until"] = datetime.fromtimestamp(now_s, UTC) + timedelta(seconds=mcfg.valid_for_s)
    return MarginParams.from_dict(_params_dict(kw))


def _params_dict(kw: dict[str, Any]) -> dict[str, Any]:
    out = dict(kw)
    if "tiers" in out:
        out["tiers"] = [{"max_notional": None if math.isinf(t.max_notional) else t.max_notional,
                         "im_rate": t.im_rate, "mm_rate": t.mm_rate} for t in out["tiers"]]
    return out


def _previous(doc: StoredRecord | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    m = doc["message"]
    return {"update_id": doc["update_id"], "im_rate": from_units(m["imRate"]), "mm_rate": from_units(m["mmRate"]),
            "mm_rate_pending": from_units(m["mmRatePending"]) if m["mmRatePending"] else None,
            "mm_effective_from": doc["params"].get("mm_effective_from"), "valid_from": doc["valid_from"],
            "fallback": doc["fallback"]}


@dataclass(frozen=True)
class PublishResult:
    """Outcome of one publish: the stored record, or why nothing was stored."""

    market: str
    record: StoredRecord | None
    skipped: str | None = None

    @property
    def fallback(self) -> bool:
        return bool(self.record and self.record["fallback"])


def publish_market(
    markets: MarketsFile,
    market_id: str,
    store: FeedStore,
    key: bytes,
    *,
    as_of: datetime | None = None,
    now: datetime | None = None,
    tracking_uri: str | None = None,
    computed: Computed | None = None,
    before_commit: Callable[[], None] | None = None,
) -> PublishResult:
    """Compute, control, sign and store the next record of ``market_id`` (see the module docstring).

    Parameters
    ----------
    markets, market_id
        Configuration and market.
    store : FeedStore
    key : bytes
        Signing key (never logged).
    as_of : datetime, optional
        Replay: bars up to this time; recorded in the lineage.
    now : datetime, optional
        Publishing time (default: the wall clock); stamps ``valid_from``.
    computed : Computed, optional
        A precomputed proposal (tests, or a caller that computed outside).
    before_commit : callable, optional
        Passed to :meth:`FeedStore.append` (fault-injection tests).

    Returns
    -------
    PublishResult
    """
    mcfg = markets.market(market_id)
    paused, why = store.is_paused(market_id)
    if paused:
        return PublishResult(market_id, None, skipped=f"market {market_id} is paused" + (f": {why}" if why else ""))
    t_now = now or datetime.now(UTC)
    if t_now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware UTC, got {t_now!r}")
    comp = computed or compute_proposal(markets, market_id, as_of=as_of, now=t_now, tracking_uri=tracking_uri)
    rules = mcfg.rules()
    domain = markets.domain()
    now_s = int(t_now.timestamp())
    skipped: list[str] = []

    def build(cur: StoredRecord | None, good: StoredRecord | None) -> dict[str, Any] | None:
        prev = PrevRates.from_message(cur["message"]) if cur is not None else None
        last_good = PrevRates.from_message(good["message"]) if good is not None else None
        if prev is not None and now_s < prev.valid_from:
            raise ValueError(f"publishing time {t_now.isoformat()} is before the current record's valid_from "
                             f"{cur['valid_from']} (clock went back?)")
        d = decide_update(comp.proposal, rules, now_s, prev, last_good)
        if d.skip:
            skipped.append(d.skip)
            return None
        params = build_params(mcfg, d, now_s, comp.sigma_h if not d.fallback else None, cur,
                              comp.grid if not d.fallback else None)
        rec = FeedRecord(market=market_id, update_id=1 if prev is None else prev.update_id + 1, params=params,
                         forecast=comp.forecast, previous=_previous(cur), fallback=d.fallback,
                         fallback_reason=d.reason, lineage=comp.lineage, adjustments=d.adjustments)
        return sign_record(rec, domain, key)

    stored = store.append(market_id, build, before_commit=before_commit)
    if stored is None:
        return PublishResult(market_id, None, skipped=skipped[0] if skipped else "nothing to publish")
    log.info("%s: published update %s (fallback=%s)", market_id, stored["update_id"], stored["fallback"])
    return PublishResult(market_id, stored)
