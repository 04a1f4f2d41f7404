"""The end-to-end job behind ``volmargin run`` and ``volmargin backtest``.

``volmargin run``: bundled data → walk-forward forecasts (the training job, logged to MLflow) → the
champion pinned at each dataset's cut (``training.registry.pinned_champion``, never the live alias) →
regime probabilities (regime model fitted before the cut, filtered after it) → policies (``predictive``
fitted on pre-cut origins only) → backtests on the held-out (post-cut) bars of each asset → frontier
sweeps → coverage tests on margin breaches (Kupiec, Christoffersen; Basel traffic light for the VaR-based
policies) → sensitivity table → HTML report → MLflow (one parent run: metrics, config, report and summary
as artifacts; only this driver process writes to MLflow) → ``<out>/summary.json``.

``volmargin backtest`` skips training: it reads saved walk-forward tables (``forecasts_dir``), else the
pinned champions' tables, else recomputes the EWMA baseline, and writes the same files.

``summary.json`` (issue 6, item 7)::

    {"assets": {"<ASSET>": {"policies": {"<policy>": {"liquidations", "bad_debt", "avg_collateral",
                                                      "traffic_light", "max_im_increase_5d"}},
                            "comparison": {"<policy>_vs_best_static": {"liquidations_change",
                                 "bad_debt_change", "share_of_bound_liquidations", "share_of_bound_bad_debt"}}}},
     "comparison": {"predictive_vs_best_static": {"liquidations_change", "bad_debt_change", "n_assets"},
                    "bound_vs_best_static": {...}},
     "mlflow_run_id": "...", "cut": {"<ASSET>": "YYYY-MM-DD"}, "config_hash": "<sha256>"}

The bound runs twice (objective liquidations, objective bad debt): its two results are the policies
``bound_liquidations`` and ``bound_bad_debt``; ``bound_vs_best_static`` takes its liquidation change from
the first and its bad-debt change from the second. Pooled changes are means of the non-null per-asset
values; ``n_assets`` counts the assets with at least one non-null value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.base import VolatilityForecast
from training.tracking import atomic_write_text, resolve_tracking_uri
from volmargin.config import RunConfig

__all__ = [
    "AssetInputs",
    "AssetOutcome",
    "RunOutput",
    "config_hash",
    "static_name",
    "load_assets",
    "evaluate_asset",
    "build_summary",
    "run_job",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Policies whose margin is a VaR/ES quantile at a stated confidence: Basel traffic light applies.
VAR_POLICIES = ("ewma_ccp", "garch_fhs")
#: Adaptive families swept along ``policies.frontier_scales``.
ADAPTIVE = ("ewma_ccp", "garch_fhs", "predictive", "oracle_vol")
BOUND_OBJECTIVES = ("liquidations", "bad_debt")


# ---------------------------------------------------------------------------- small helpers
def static_name(level: float) -> str:
    """Policy name of a static IM level: ``static_0.10``, ``static_0.125``."""
    s = f"{level:.2f}"
    return f"static_{s}" if float(s) == level else f"static_{level:g}"


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of the validated config (canonical JSON, sorted keys)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _utc(t: Any) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")


def _replace_path(obj: Any, dotted: str, value: Any) -> Any:
    """``dataclasses.replace`` along a dotted field path (nested frozen dataclasses)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        cur = getattr(obj, head)
        if isinstance(cur, bool):
            value = bool(value)
        elif isinstance(cur, int) and float(value).is_integer():
            value = int(value)
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _replace_path(getattr(obj, head), rest, value)})


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class AssetInputs:
    """Everything the margin side needs for one dataset.

    Attributes
    ----------
    dataset, asset : str
        Dataset id and its label (``BTC``, ``ETH``, ``LTC``, ``BTC-15m``).
    cut : pd.Timestamp
        UTC cut: policies are fitted on origins before it and scored on bars from it on.
    bars : pd.DataFrame
        OHLCV bars (prices in quote currency) from the first forecast origin on; UTC index.
    forecast : VolatilityForecast
        The pinned champion's walk-forward forecasts, one row per bar of ``bars``.
    regime_probs : pd.DataFrame or None
        Filtered regime probabilities per bar (calm … stressed), parameters fitted before the cut.
    champion : dict
        ``model_version``, ``model_key``, ``spec``, ``forecast_table`` (where the forecasts came from).
    quality : dict
        The dataset's ``QualityReport.to_dict()``.
    table : pd.DataFrame
        The full walk-forward table (``h.*``, ``y.*``, ``r.*``) for the report.
    """

    dataset: str
    asset: str
    cut: pd.Timestamp
    bars: pd.DataFrame
    forecast: VolatilityForecast
    regime_probs: pd.DataFrame | None
    champion: dict[str, Any]
    quality: dict[str, Any]
    table: pd.DataFrame


def _prepare(dataset: str) -> Any:
    from data_pipelines.pipeline import prepare_dataset

    return prepare_dataset(dataset, policy="repair")


def _std_resid(table: pd.DataFrame, cut: pd.Timestamp) -> np.ndarray:
    """Out-of-sample standardized residuals ``r.1 / sqrt(h.1)`` of origins whose next bar is before the cut."""
    r = table["r.1"].to_numpy(dtype=float)
    h = table["h.1"].to_numpy(dtype=float)
    idx = pd.DatetimeIndex(table.index)
    pre = np.append(np.asarray(idx[1:] < cut), False)  # the next bar (r.1's bar) lies before the cut
    z = r / np.sqrt(h)
    z = z[pre & np.isfinite(z)]
    if len(z) < 30:
        raise ValueError(f"only {len(z)} pre-cut standardized residuals; need >= 30 for filtered historical simulation")
    return z


def forecast_from_table(table: pd.DataFrame, *, model: str, version: str, cut: pd.Timestamp) -> VolatilityForecast:
    """A walk-forward table (``h.*`` [+ ``p.*``, ``q*``] columns) as a ``VolatilityForecast`` with pre-cut
    standardized residuals (for FHS)."""
    keep = [c for c in table.columns if c.startswith("h.") or c.startswith("p.") or (c.startswith("q") and ".h." in c)]
    df = table[keep].copy()
    df.index = pd.DatetimeIndex(table.index)
    if df.index.tz is None:
        df.index = df.index.tz_localize("UTC")
    return VolatilityForecast.from_long_frame(df, model=model, version=version, std_resid=_std_resid(table, cut))


def _regime_probs(cfg: RunConfig, features: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame | None:
    """Regime model fitted on bars before the cut; filtered probabilities for every bar (NaN rows filled
    forward, leading ones uniform)."""
    if not cfg.regime.enabled:
        return None
    from models.regime import RegimeForecaster

    params = dict(cfg.regime.params)
    params.setdefault("seed", cfg.seed)
    model = RegimeForecaster(**params)
    pre = features[features.index < cut]
    model.fit(pre)
    probs = model.regime_probabilities(features)
    probs = probs.ffill().fillna(1.0 / probs.shape[1])
    return probs


def _load_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"forecast table not found: {p}")
    df = pd.read_parquet(p)
    idx = pd.DatetimeIndex(df.index)
    df.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
    return df


def _saved_table(forecasts_dir: str, asset: str, dataset: str) -> tuple[pd.DataFrame, str] | None:
    root = Path(forecasts_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"forecasts_dir not found: {root}")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
    for cand in (root / f"{asset}.parquet", root / f"{safe}.parquet"):
        if cand.is_file():
            return _load_table(cand), str(cand)
    for sub in (root / asset, root / safe):
        if sub.is_dir():
            files = sorted(sub.glob("*.parquet"))
            if len(files) == 1:
                return _load_table(files[0]), str(files[0])
            if files:
                raise ValueError(
                    f"forecasts_dir {sub} holds several tables {[f.name for f in files]}; keep one per asset"
                )
    return None


def _ewma_table(cfg: RunConfig, features: pd.DataFrame, dataset: str, cut: pd.Timestamp) -> pd.DataFrame:
    """Recompute the EWMA baseline's walk-forward table (``volmargin backtest`` with nothing saved)."""
    from training.walk_forward import WalkForwardTask, walk_forward

    wf = cfg.training.walk_forward
    task = WalkForwardTask(
        asset=dataset, frame=features, model_name="ewma", model_key="ewma", params={},
        horizon=cfg.training.horizon, cut=cut, min_train=wf.min_train, refit_every=wf.refit_every,
        block=wf.block, proxy=cfg.training.proxy, seed=cfg.seed,
    )
    return walk_forward(task).table()


def _train(cfg: RunConfig, prepared: Mapping[str, Any], progress: Progress | None) -> dict[str, Any]:
    """Walk-forward training of every dataset (one training job per distinct cut); returns evaluations."""
    from training.job import run_training

    groups: dict[dt.date, list[str]] = {}
    for ds in cfg.datasets:
        groups.setdefault(cfg.cut_for(ds), []).append(ds)
    evaluations: dict[str, Any] = {}
    runs: list[str] = []
    for cut, dsets in groups.items():
        tcfg = cfg.train_config(dsets, cut)

        def loader(ds: str) -> tuple[str, pd.DataFrame]:
            return prepared[ds].asset, prepared[ds].features

        def prog(stage: str, done: int, total: int) -> None:
            if progress:
                progress(f"training ({stage})", done, total)

        res = run_training(tcfg, loader=loader, progress=prog)
        runs.append(res.run_id)
        for ds, ev in res.evaluation["assets"].items():
            evaluations[ds] = ev
    return {"assets": evaluations, "training_run_ids": runs}


def load_assets(
    cfg: RunConfig, *, mode: str = "run", progress: Progress | None = None
) -> tuple[dict[str, AssetInputs], dict[str, Any]]:
    """Prepare data, train (``mode="run"``), pin the champion at each cut and build the policy inputs.

    Returns
    -------
    (inputs, training)
        ``inputs`` per dataset id; ``training`` holds the evaluations and training run ids (empty for
        ``mode="backtest"``).
    """
    if mode not in ("run", "backtest"):
        raise ValueError(f"mode must be 'run' or 'backtest', got {mode!r}")
    from training.registry import pinned_champion

    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    prepared = {}
    for i, ds in enumerate(cfg.datasets):
        prepared[ds] = _prepare(ds)
        if progress:
            progress("data", i + 1, len(cfg.datasets))
    training: dict[str, Any] = {"assets": {}, "training_run_ids": []}
    if mode == "run":
        training = _train(cfg, prepared, progress)
    inputs: dict[str, AssetInputs] = {}
    for i, ds in enumerate(cfg.datasets):
        p = prepared[ds]
        cut = _utc(cfg.cut_for(ds))
        table = None
        champion: dict[str, Any] = {}
        if mode == "backtest" and cfg.forecasts_dir:
            found = _saved_table(cfg.forecasts_dir, p.asset, ds)
            if found is None:
                raise FileNotFoundError(f"no saved forecast table for {p.asset} ({ds}) under {cfg.forecasts_dir}")
            table, src = found
            champion = {"model_version": None, "model_key": Path(src).stem, "spec": {}, "forecast_table": src}
        if table is None:
            try:
                pin = pinned_champion(ds, cfg.cut_for(ds), artifacts_dir=cfg.artifacts_dir, tracking_uri=uri)
                table = _load_table(pin.forecast_table)
                champion = {
                    "model_version": pin.model_version,
                    "model_key": pin.spec.get("key") or pin.spec.get("name"),
                    "spec": pin.spec,
                    "forecast_table": pin.forecast_table,
                }
            except (KeyError, FileNotFoundError) as exc:
                if mode == "run":
                    raise
                log.warning("%s: %s; recomputing the EWMA baseline", ds, exc)
                table = _ewma_table(cfg, p.features, ds, cut)
                champion = {"model_version": None, "model_key": "ewma", "spec": {"name": "ewma"},
                            "forecast_table": "recomputed"}
        forecast = forecast_from_table(
            table, model=str(champion["model_key"]), version=str(champion.get("model_version") or ""), cut=cut
        )
        bars_idx = p.bars.index if p.bars.index.tz is not None else p.bars.index.tz_localize("UTC")
        bars = p.bars.copy()
        bars.index = bars_idx
        bars = bars.loc[bars.index.isin(forecast.origins)]
        if len(bars) != len(forecast):
            keep = forecast.origins.isin(bars.index)
            forecast = forecast._take(np.asarray(keep))
        if not (bars.index > cut).any() or not (bars.index < cut).any():
            raise ValueError(f"{ds}: cut {cut.date()} must fall inside the forecast origins "
                             f"{bars.index[0].date()} .. {bars.index[-1].date()}")
        feats = p.features.copy()
        feats.index = bars_idx
        probs = _regime_probs(cfg, feats, cut)
        if probs is not None:
            probs = probs.reindex(bars.index)
        inputs[ds] = AssetInputs(
            dataset=ds, asset=p.asset, cut=cut, bars=bars[["open", "high", "low", "close", "volume"]],
            forecast=forecast, regime_probs=probs, champion=champion, quality=p.report.to_dict(),
            table=table.loc[table.index.isin(bars.index)],
        )
        if progress:
            progress("champion forecasts", i + 1, len(cfg.datasets))
    return inputs, training


# ---------------------------------------------------------------------------- margin-side settings
def build_controls(cfg: RunConfig) -> Any:
    """``margin.controls.Controls`` from the config."""
    from margin.controls import Controls

    return Controls(**cfg.controls.model_dump())


def build_population_config(cfg: RunConfig, overrides: Mapping[str, Any] | None = None) -> Any:
    """``margin.population.PopulationConfig`` from the ``population`` section (seed from ``seed``)."""
    from margin.population import PopulationConfig

    d = dict(cfg.population)
    if isinstance(d.get("funding_rate"), list):
        d["funding_rate"] = tuple(d["funding_rate"])
    pc = PopulationConfig(**d, seed=cfg.seed)
    for k, v in (overrides or {}).items():
        pc = _replace_path(pc, k, v)
    return pc


def build_backtest_config(cfg: RunConfig, overrides: Mapping[str, Any] | None = None) -> Any:
    """``margin.backtest.BacktestConfig`` from the ``backtest`` section (``liquidation`` as a mapping)."""
    from margin.backtest import BacktestConfig
    from margin.params import LiquidationSettings

    d = dict(cfg.backtest)
    if "liquidation" in d:
        d["liquidation"] = LiquidationSettings(**dict(d["liquidation"]))
    if isinstance(d.get("funding_rate"), list):
        d["funding_rate"] = tuple(d["funding_rate"])
    bc = BacktestConfig(**d)
    for k, v in (overrides or {}).items():
        bc = _replace_path(bc, k, v)
    return bc


# ---------------------------------------------------------------------------- one asset
@dataclass(frozen=True)
class AssetOutcome:
    """Backtests and comparisons of one asset on its held-out bars.

    ``results`` are scored in the normal setting (volume slippage on, top-ups, fees, funding);
    ``frozen`` in the bound's frozen setting (volume slippage off, bad debt before the fund), where the
    shares of the bound are computed. ``comparison`` holds the summary's four numbers per policy;
    ``reasons`` says why a number is null.
    """

    inputs: AssetInputs
    paths: dict[str, Any]
    results: dict[str, Any]
    frozen: dict[str, Any]
    frontiers: dict[str, Any]
    frontiers_frozen: dict[str, Any]
    comparison: dict[str, dict[str, Any]]
    reasons: dict[str, dict[str, str]]
    coverage: dict[str, dict[str, Any]]
    predictive_params: dict[str, Any]
    sensitivity: list[dict[str, Any]]
    seconds: float


def scaled_path(path: Any, scale: float, controls: Any, *, deployable: bool = True) -> Any:
    """``path`` with IM multiplied by ``scale`` (a frontier point of its family).

    Deployable paths go through the controls again (the change cap is relative, so scaling keeps it;
    the floor and ceiling clip); references keep their MM rule.
    """
    from margin.controls import apply_controls
    from margin.policies import MarginPath

    im = np.minimum(np.asarray(path.im_rate) * scale, 1.0)
    meta = {**path.meta, "frontier_scale": scale}
    if deployable:
        cp = apply_controls(im, controls)
        return MarginPath(times=path.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=path.policy, meta=meta,
                          mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar)
    mm = np.minimum(np.asarray(path.mm_rate) * scale, im)
    return MarginPath(times=path.times, im_rate=im, mm_rate=mm, policy=path.policy, meta=meta, mm_binds=path.mm_binds)


def _bound_frontier(tab: Any, objective: str, targets: list[float]) -> Any:
    """Bound frontier (one objective) from its cohort table: one point per collateral target."""
    from margin.frontier import Frontier, FrontierPoint
    from margin.policies import solve_lambda

    expo = float(tab.exposure.sum())
    pts = []
    lams = sorted({0.0, *(solve_lambda(tab, objective, t) for t in targets)})
    for lam in lams:
        ch = tab.choose(objective, lam)
        r = np.arange(ch.size)
        coll = float(tab.collateral[r, ch].sum())
        pts.append(FrontierPoint(scale=float(lam), avg_collateral=coll / expo if expo > 0 else float("nan"),
                                 liquidations=float(tab.liquidations[r, ch].sum()),
                                 bad_debt=float(tab.bad_debt[r, ch].sum()), policy=f"bound_{objective}"))
    return Frontier(family=f"bound_{objective}", points=tuple(pts))


def horizon_breaches(close: np.ndarray, im: np.ndarray, first: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Exceptions of the IM over non-overlapping ``horizon``-bar windows from bar ``first`` on.

    Window ``k`` starts at bar ``t = first + k * horizon`` with the IM published at its close; a long
    (short) breach is a loss ``1 - C[t+h]/C[t]`` (``C[t+h]/C[t] - 1``) larger than ``im[t]``, per unit of
    notional. Windows do not overlap, so independent exceptions stay independent (Kupiec, Christoffersen).
    """
    c = np.asarray(close, dtype=np.float64)
    starts = np.arange(first, c.size - horizon, horizon)
    ratio = c[starts + horizon] / c[starts]
    m = np.asarray(im, dtype=np.float64)[starts]
    return (1.0 - ratio) > m, (ratio - 1.0) > m


def _coverage(name: str, path: Any, res: Any, inp: AssetInputs) -> dict[str, Any]:
    """Coverage tests on margin breaches over the held-out bars.

    Every policy: the backtester's one-bar breach series (close-to-close loss of a 1-unit long or short
    beyond the IM published before the bar): breach rate and Christoffersen independence. The VaR-based
    policies (``ewma_ccp``, ``garch_fhs``) state a confidence ``c`` and a horizon ``h``: their IM is tested
    on non-overlapping ``h``-bar windows (:func:`horizon_breaches`), each side against ``p = 1 - c``
    (Kupiec, Christoffersen) with a Basel traffic light scaled to the number of windows by binomial
    quantiles (``training.tests.traffic_light``); the worse side is reported. Other policies state no
    confidence: traffic light null.
    """
    from training.tests import christoffersen_independence, coverage_test, traffic_light

    cut = inp.cut
    br = res.breaches
    br = br[pd.DatetimeIndex(br.index) >= cut] if len(br) else br
    out: dict[str, Any] = {"n": int(len(br))}
    if len(br) < 2:
        out.update({"traffic_light": None, "reason": "fewer than 2 held-out bars"})
        return out
    both = br["breach_im"].to_numpy(dtype=bool)
    out["breach_rate"] = float(both.mean())
    out["christoffersen_p"] = christoffersen_independence(both)[1]
    meta = path.meta if isinstance(path.meta, dict) else {}
    conf = meta.get("confidence")
    if name in VAR_POLICIES and conf is not None:
        p = 1.0 - float(conf)
        h = int(meta.get("horizon", 1))
        first = int(pd.DatetimeIndex(inp.bars.index).searchsorted(cut))
        longs, shorts = horizon_breaches(inp.bars["close"].to_numpy(dtype=float), path.im_rate, first, h)
        if len(longs) < 2:
            out.update({"traffic_light": None, "reason": f"fewer than 2 held-out {h}-bar windows"})
            return out
        zones = {"green": 0, "yellow": 1, "red": 2}
        worst = None
        for side, b in (("long", longs), ("short", shorts)):
            ct = coverage_test(b, p).to_dict()
            ct["traffic_light"] = traffic_light(b, p=p).value
            out[side] = ct
            if worst is None or zones[ct["traffic_light"]] > zones[worst[1]["traffic_light"]]:
                worst = (side, ct)
        assert worst is not None
        out.update({"p": p, "horizon": h, "windows": int(len(longs)), "worst_side": worst[0],
                    "traffic_light": worst[1]["traffic_light"], "kupiec_p": worst[1]["p_uc"],
                    "christoffersen_p": worst[1]["p_ind"]})
    else:
        out["traffic_light"] = None
    return out


def _crash_days(bars: pd.DataFrame, cut: pd.Timestamp, results: Mapping[str, Any], k: int = 6) -> pd.DataFrame:
    """The ``k`` largest close-to-close drops after the cut with each policy's liquidations that bar."""
    close = bars["close"].astype(float)
    r = np.log(close).diff()
    r = r[r.index >= cut].dropna()
    worst = r.nsmallest(min(k, len(r)))
    df = pd.DataFrame({"return": np.expm1(worst)}, index=worst.index)
    df.index.name = "bar"
    for name, res in results.items():
        s = res.series["liquidations"] if "liquidations" in res.series else None
        if s is not None:
            df[f"liq.{name}"] = s.reindex(df.index).fillna(0).astype(int).to_numpy()
    df.index = [t.strftime("%Y-%m-%d %H:%M") if t.hour or t.minute else t.strftime("%Y-%m-%d") for t in df.index]
    df.index.name = "bar"
    return df


def _compare_entry(norm: Mapping[str, Any], froz: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    entry = {
        "liquidations_change": _finite(norm.get("liquidations_change")),
        "bad_debt_change": _finite(norm.get("bad_debt_change")),
        "share_of_bound_liquidations": _finite(froz.get("share_of_bound_liquidations")),
        "share_of_bound_bad_debt": _finite(froz.get("share_of_bound_bad_debt")),
    }
    reasons = {}
    for k in ("liquidations_change", "bad_debt_change"):
        if entry[k] is None:
            reasons[k] = str((norm.get("reasons") or {}).get(k, "undefined"))
    for k in ("share_of_bound_liquidations", "share_of_bound_bad_debt"):
        if entry[k] is None:
            reasons[k] = str((froz.get("reasons") or {}).get(k, "undefined"))
    return entry, reasons


def evaluate_asset(
    inp: AssetInputs,
    cfg: RunConfig,
    *,
    population_overrides: Mapping[str, Any] | None = None,
    backtest_overrides: Mapping[str, Any] | None = None,
    sensitivity: bool = False,
    progress: Progress | None = None,
) -> AssetOutcome:
    """Fit, backtest and compare every policy on one asset (see the module docstring)."""
    from margin.backtest import run_backtest
    from margin.frontier import compare, frontier_from_results
    from margin.policies import PolicyContext, fit_predictive, make_policy
    from margin.population import generate_population

    t0 = time.perf_counter()
    controls = build_controls(cfg)
    ctx = PolicyContext(bars=inp.bars, forecast=inp.forecast, regime_probs=inp.regime_probs, cut=inp.cut,
                        controls=controls)
    pop_cfg = build_population_config(cfg, population_overrides)
    population = generate_population(len(inp.bars), pop_cfg, volume=inp.bars["volume"].to_numpy(dtype=float))
    bt = build_backtest_config(cfg, backtest_overrides)
    btf = bt.frozen_copy()
    levels = list(cfg.policies.static_levels)
    pol = cfg.policies
    steps = len(levels) + 12  # fit, one per path, two bounds, four frontier sweeps, sensitivity
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"backtests {inp.asset}", done, steps)

    def run(path: Any, c: Any = bt) -> Any:
        return run_backtest(inp.bars, path, population, c, start=inp.cut)

    paths: dict[str, Any] = {}
    for lv in levels:
        paths[static_name(lv)] = make_policy(static_name(lv)).path(ctx)
    paths["ewma_ccp"] = make_policy("ewma_ccp", **pol.ewma_ccp).path(ctx)
    paths["garch_fhs"] = make_policy("garch_fhs", **{"seed": cfg.seed, **pol.garch_fhs}).path(ctx)
    predictive = fit_predictive(ctx, population, bt, pol.objective.weights(), **pol.predictive)
    tick()
    paths["predictive"] = predictive.path(ctx)
    paths["oracle_vol"] = make_policy("oracle_vol", **pol.oracle_vol).path(ctx)
    results: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for name, path in paths.items():
        results[name] = run(path)
        frozen[name] = run(path, btf)
        tick()
    static_front = frontier_from_results("static", {lv: results[static_name(lv)] for lv in levels})
    static_front_f = frontier_from_results("static", {lv: frozen[static_name(lv)] for lv in levels})
    frontiers: dict[str, Any] = {"static": static_front}
    frontiers_f: dict[str, Any] = {"static": static_front_f}
    # the bound: cohort table in the frozen setting on the held-out window, one frontier per objective
    bcfg = dict(pol.bound)
    grid = tuple(bcfg.pop("grid", levels))
    bound = make_policy("bound_liquidations", population=population, backtest_cfg=bt, grid=grid, **bcfg)
    tab = bound.table(ctx)
    targets = [frozen[static_name(lv)].avg_collateral for lv in levels]
    bound_fronts = {obj: _bound_frontier(tab, obj, targets) for obj in BOUND_OBJECTIVES}
    for obj in BOUND_OBJECTIVES:
        frontiers_f[f"bound_{obj}"] = bound_fronts[obj]
        b = make_policy(f"bound_{obj}", population=population, backtest_cfg=bt, grid=grid,
                        target_avg_collateral=frozen["predictive"].avg_collateral, **bcfg)
        paths[f"bound_{obj}"] = b.path(ctx, table=tab)
        frozen[f"bound_{obj}"] = run(paths[f"bound_{obj}"], btf)
        results[f"bound_{obj}"] = frozen[f"bound_{obj}"]  # the bound is only defined in the frozen setting
        tick()
    comparison: dict[str, dict[str, Any]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for name in ADAPTIVE:
        entry, why = _compare_entry(compare(results[name], static_front), compare(frozen[name], static_front_f, bound_fronts))
        comparison[f"{name}_vs_best_static"] = entry
        if why:
            reasons[f"{name}_vs_best_static"] = why
    bl = compare(frozen["bound_liquidations"], static_front_f, bound_fronts)
    bd = compare(frozen["bound_bad_debt"], static_front_f, bound_fronts)
    entry, why = _compare_entry(
        {"liquidations_change": bl["liquidations_change"], "bad_debt_change": bd["bad_debt_change"],
         "reasons": {"liquidations_change": bl["reasons"].get("liquidations_change"),
                     "bad_debt_change": bd["reasons"].get("bad_debt_change")}},
        {"share_of_bound_liquidations": bl["share_of_bound_liquidations"],
         "share_of_bound_bad_debt": bd["share_of_bound_bad_debt"],
         "reasons": {"share_of_bound_liquidations": bl["reasons"].get("share_of_bound_liquidations"),
                     "share_of_bound_bad_debt": bd["reasons"].get("share_of_bound_bad_debt")}},
    )
    comparison["bound_vs_best_static"] = entry
    if why:
        reasons["bound_vs_best_static"] = why
    # frontier sweeps of the adaptive families (normal setting)
    for name in ADAPTIVE:
        scaled = {1.0: results[name]}
        for s in pol.frontier_scales:
            if s != 1.0:
                scaled[s] = run(scaled_path(paths[name], s, controls, deployable=name != "oracle_vol"))
        frontiers[name] = frontier_from_results(name, scaled)
        tick()
    coverage = {name: _coverage(name, paths[name], res, inp) for name, res in results.items()}
    sens: list[dict[str, Any]] = []
    if sensitivity and cfg.sensitivity.enabled:
        sens = _sensitivity(inp, cfg, ctx, paths["predictive"])
    tick()
    fitted = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in predictive.params().items()}
    fitted.update({k: predictive.fitted.get(k) for k in ("alpha", "beta", "evaluations", "n_positions_fit")})
    return AssetOutcome(
        inputs=inp, paths=paths, results=results, frozen=frozen, frontiers=frontiers, frontiers_frozen=frontiers_f,
        comparison=comparison, reasons=reasons, coverage=coverage, predictive_params=fitted, sensitivity=sens,
        seconds=time.perf_counter() - t0,
    )


def _sensitivity(inp: AssetInputs, cfg: RunConfig, ctx: Any, predictive_path: Any) -> list[dict[str, Any]]:
    """One row per varied assumption value: the predictive policy (parameters from the base fit) against
    the static frontier recomputed under that assumption."""
    from margin.backtest import run_backtest
    from margin.frontier import compare, frontier_from_results
    from margin.policies import make_policy
    from margin.population import generate_population

    rows = []
    levels = list(cfg.policies.static_levels)
    static_paths = {lv: make_policy(static_name(lv)).path(ctx) for lv in levels}
    base = {"assumption": "base", "value": None}
    variants: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [(base, {}, {})]
    for path, values in cfg.sensitivity.vary.items():
        section, _, key = path.partition(".")
        for v in values:
            row = {"assumption": path, "value": v}
            variants.append((row, {key: v} if section == "population" else {}, {key: v} if section == "backtest" else {}))
    for row, pov, bov in variants:
        pop = generate_population(len(inp.bars), build_population_config(cfg, pov),
                                  volume=inp.bars["volume"].to_numpy(dtype=float))
        bt = build_backtest_config(cfg, bov)
        st = {lv: run_backtest(inp.bars, p, pop, bt, start=inp.cut) for lv, p in static_paths.items()}
        front = frontier_from_results("static", st)
        res = run_backtest(inp.bars, predictive_path, pop, bt, start=inp.cut)
        c = compare(res, front)
        rows.append({"asset": inp.asset, **row, "liquidations": int(res.liquidations), "bad_debt": float(res.bad_debt),
                     "avg_collateral": float(res.avg_collateral),
                     "liquidations_change": _finite(c["liquidations_change"]),
                     "bad_debt_change": _finite(c["bad_debt_change"]), "note": c.get("reason")})
    return rows


def check_policy_settings(cfg: RunConfig) -> None:
    """Build every configured policy once (cheap), so a bad setting fails before any work."""
    import inspect

    from margin.policies import fit_predictive, make_policy

    pol = cfg.policies
    for name in ("ewma_ccp", "garch_fhs", "oracle_vol"):
        try:
            make_policy(name, **getattr(pol, name))
        except ValueError as exc:
            raise ValueError(f"policies.{name}: {exc}") from None
    params = inspect.signature(fit_predictive).parameters
    allowed = {k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(pol.predictive) - allowed)
    if unknown:
        raise ValueError(f"policies.predictive: unknown key(s) {unknown}; known: {sorted(allowed)}")
    bound = {k: v for k, v in pol.bound.items() if k != "grid"}
    try:
        make_policy("bound_liquidations", population=None, **bound)
    except ValueError as exc:
        raise ValueError(f"policies.bound: {exc}") from None


def _evaluate_task(task: tuple[AssetInputs, RunConfig, bool]) -> AssetOutcome:
    """Executor entry point (module level so that it pickles): one asset's backtests, no MLflow."""
    inp, cfg, sens = task
    return evaluate_asset(inp, cfg, sensitivity=sens)


def evaluate_assets(
    cfg: RunConfig, inputs: Mapping[str, AssetInputs], *, progress: Progress | None = None
) -> dict[str, AssetOutcome]:
    """Evaluate every asset, in parallel through ``volmargin.executor`` when ``training.executor.workers``
    > 1 (workers compute and return; only the driver writes files and MLflow). Ordered as ``cfg.datasets``."""
    from volmargin.executor import TaskError, make_executor

    sens_assets = set(cfg.sensitivity.assets or [inputs[cfg.datasets[0]].asset])
    ex = cfg.training.executor
    done: dict[str, AssetOutcome] = {}
    if ex.workers > 1 and len(cfg.datasets) > 1:
        executor = make_executor(ex.backend, ex.workers, ex.address)
        tasks = [(inputs[ds], cfg, inputs[ds].asset in sens_assets) for ds in cfg.datasets]
        if progress:
            progress("backtests (assets, in parallel)", 0, len(tasks))
        try:
            for i, res in executor.map_unordered(_evaluate_task, tasks):
                done[cfg.datasets[i]] = res
                log.info("%s evaluated in %.1fs", res.inputs.asset, res.seconds)
                if progress:
                    progress("backtests (assets, in parallel)", len(done), len(tasks))
        except TaskError as exc:
            if isinstance(exc.__cause__, ValueError | KeyError | TypeError | FileNotFoundError):
                raise exc.__cause__ from None
            raise
    else:
        for ds in cfg.datasets:
            inp = inputs[ds]
            done[ds] = evaluate_asset(inp, cfg, sensitivity=inp.asset in sens_assets, progress=progress)
            log.info("%s evaluated in %.1fs", inp.asset, done[ds].seconds)
    return {ds: done[ds] for ds in cfg.datasets}


# ---------------------------------------------------------------------------- summary
def _policy_entry(res: Any, coverage: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "liquidations": int(res.liquidations),
        "bad_debt": float(res.bad_debt),
        "avg_collateral": float(res.avg_collateral),
        "traffic_light": coverage.get("traffic_light"),
        "max_im_increase_5d": float(res.max_im_increase_5d),
    }


def _pooled(per_asset: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    used = 0
    for metric in ("liquidations_change", "bad_debt_change"):
        vals = [v[metric] for v in per_asset if v.get(metric) is not None]
        out[metric] = float(np.mean(vals)) if vals else None
    used = sum(1 for v in per_asset if v.get("liquidations_change") is not None or v.get("bad_debt_change") is not None)
    out["n_assets"] = used
    return out


def build_summary(outcomes: Mapping[str, AssetOutcome], *, run_id: str | None, cfg_hash: str) -> dict[str, Any]:
    """``summary.json`` (issue 6 item 7) from the per-asset outcomes; see the module docstring."""
    assets: dict[str, Any] = {}
    cuts: dict[str, str] = {}
    for out in outcomes.values():
        a = out.inputs.asset
        cuts[a] = str(out.inputs.cut.date())
        assets[a] = {
            "policies": {name: _policy_entry(res, out.coverage.get(name, {})) for name, res in out.results.items()},
            "comparison": {k: dict(v) for k, v in out.comparison.items()},
        }
    pooled = {
        key: _pooled([a["comparison"][key] for a in assets.values() if key in a["comparison"]])
        for key in ("predictive_vs_best_static", "bound_vs_best_static")
    }
    return {"assets": assets, "comparison": pooled, "mlflow_run_id": run_id, "cut": cuts, "config_hash": cfg_hash}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------------- report data
def _report_asset(out: AssetOutcome) -> Any:
    from volmargin.report import AssetReport

    inp = out.inputs
    bars = inp.bars[inp.bars.index >= inp.cut]
    r = np.log(inp.bars["close"].astype(float)).diff()
    step = pd.Series(inp.bars.index).diff().median()
    per_year = pd.Timedelta(days=365) / step if isinstance(step, pd.Timedelta) and step > pd.Timedelta(0) else 365.0
    rv = r.rolling(30, min_periods=10).std() * math.sqrt(per_year)
    series = pd.DataFrame({"close": bars["close"].astype(float), "realized_vol": rv.reindex(bars.index)})
    for name, path in out.paths.items():
        if name.startswith("bound"):
            continue
        s = pd.Series(np.asarray(path.im_rate), index=path.times)
        series[f"im.{name}"] = s.reindex(bars.index).to_numpy()
    policies = {}
    for name, res in out.results.items():
        cov = out.coverage.get(name, {})
        policies[name] = {
            **{k: float(v) for k, v in res.metrics().items()},
            "liquidations": int(res.liquidations),
            "traffic_light": cov.get("traffic_light"),
            "breach_rate": cov.get("breach_rate"),
            "kupiec_p": cov.get("kupiec_p"),
            "christoffersen_p": cov.get("christoffersen_p"),
        }
    comparison = {k: {**v, "reason": "; ".join(f"{a}: {b}" for a, b in out.reasons.get(k, {}).items()) or None}
                  for k, v in out.comparison.items()}
    frontiers = {k: [p.to_dict() for p in f.points] for k, f in out.frontiers.items()}
    shown = {k: v for k, v in out.results.items() if not k.startswith("static") or k == "static_0.10"}
    for k in ("bound_liquidations", "bound_bad_debt"):
        if k in out.frontiers_frozen:
            frontiers[f"{k} (frozen)"] = [p.to_dict() for p in out.frontiers_frozen[k].points]
    return AssetReport(
        asset=inp.asset, dataset=inp.dataset, cut=str(inp.cut.date()), champion=inp.champion, policies=policies,
        comparison=comparison, frontiers=frontiers, series=series,
        crash_days=_crash_days(inp.bars, inp.cut, shown),
        predictive_params=out.predictive_params,
    )


def _champion_quality(outcomes: Mapping[str, AssetOutcome]) -> pd.DataFrame:
    """Pre-cut and held-out QLIKE of each asset's champion table against its proxy (``y.*`` columns), for
    ``volmargin backtest`` where no training evaluation is at hand."""
    from training.metrics import qlike

    rows = []
    for o in outcomes.values():
        t = o.inputs.table
        h = sorted((c for c in t.columns if c.startswith("h.")), key=lambda c: int(c[2:]))
        y = [f"y.{c[2:]}" for c in h]
        if not set(y) <= set(t.columns):
            continue
        idx = pd.DatetimeIndex(t.index)
        steps = len(h)
        pos = np.arange(len(t))
        cut_pos = int(idx.searchsorted(o.inputs.cut))
        masks = {"pre": pos + steps < cut_pos, "held_out": pos >= cut_pos}
        row: dict[str, Any] = {"asset": o.inputs.asset, "model": o.inputs.champion.get("model_key"), "champion": True}
        for k, m in masks.items():
            row[f"qlike_{k}"] = _finite(qlike(t.loc[m, y].to_numpy().ravel(), t.loc[m, h].to_numpy().ravel()))
        row["n_held_out"] = int(masks["held_out"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _forecast_quality(training: Mapping[str, Any], outcomes: Mapping[str, AssetOutcome] | None = None) -> pd.DataFrame:
    from training.evaluation import held_out_table

    if not training.get("assets"):
        return _champion_quality(outcomes or {})
    df = held_out_table({"assets": training["assets"]})
    labels = {ds: ev.get("asset_label", ds) for ds, ev in training["assets"].items()}
    df["asset"] = df["asset"].map(lambda d: labels.get(d, d))
    return df


# ---------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class RunOutput:
    """What ``run_job`` wrote."""

    out_dir: Path
    summary: dict[str, Any]
    summary_path: Path
    report_path: Path
    details_path: Path
    run_id: str
    tracking_uri: str
    seconds: float


def _flat_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat_params(v, name + "."))
        else:
            out[name] = json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500]
    return out


def run_job(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    mode: str = "run",
    config_path: str | Path | None = None,
    progress: Progress | None = None,
) -> RunOutput:
    """Run the end-to-end job (``mode="run"``) or the backtest alone (``mode="backtest"``).

    Writes ``<out_dir>/summary.json``, ``report.html`` and ``details.json`` (atomically) and logs one
    MLflow parent run in the experiment ``cfg.name`` (params: the flattened config; metrics: the summary's
    numbers; artifacts: config, summary, details, report). Only this process writes to MLflow.
    """
    import mlflow

    from training.tracking import flatten_metrics
    from volmargin.report import ReportData, write_report

    t0 = time.perf_counter()
    out = Path(out_dir)
    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    build_controls(cfg), build_population_config(cfg), build_backtest_config(cfg)  # fail fast on bad settings
    check_policy_settings(cfg)
    inputs, training = load_assets(cfg, mode=mode, progress=progress)
    outcomes = evaluate_assets(cfg, inputs, progress=progress)
    chash = config_hash(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.name)
    status = "FAILED"
    run = mlflow.start_run(run_name=f"{cfg.name}-{mode}", tags={"job": mode, "config_hash": chash})
    run_id = run.info.run_id
    try:
        summary = _json_safe(build_summary(outcomes, run_id=run_id, cfg_hash=chash))
        sens = pd.DataFrame([r for o in outcomes.values() for r in o.sensitivity])
        details = _json_safe({
            "mode": mode,
            "training_run_ids": training.get("training_run_ids", []),
            "assets": {
                o.inputs.asset: {
                    "dataset": o.inputs.dataset,
                    "champion": o.inputs.champion,
                    "reasons": o.reasons,
                    "coverage": o.coverage,
                    "predictive_params": o.predictive_params,
                    "metrics": {k: r.metrics() for k, r in o.results.items()},
                    "metrics_frozen": {k: r.metrics() for k, r in o.frozen.items()},
                    "frontiers": {k: f.to_dict() for k, f in o.frontiers.items()},
                    "frontiers_frozen": {k: f.to_dict() for k, f in o.frontiers_frozen.items()},
                    "seconds": o.seconds,
                }
                for o in outcomes.values()
            },
            "sensitivity": sens.to_dict("records"),
        })
        notes = [
            "Changes against the best static are scored in the normal setting (volume-dependent slippage, "
            "top-ups, fees, funding); shares of the bound are scored in the bound's frozen setting "
            "(volume slippage off, bad debt before the fund), where the bound is the best entry-IM path on "
            "its grid.",
            f"Training runs: {', '.join(training.get('training_run_ids', [])) or 'none (backtest only)'}.",
        ]
        data = ReportData(
            title=f"volmargin {mode}: {cfg.name}",
            summary=summary,
            assets=[_report_asset(o) for o in outcomes.values()],
            forecast_quality=_forecast_quality(training, outcomes),
            data_quality={o.inputs.dataset: o.inputs.quality for o in outcomes.values()},
            sensitivity=sens,
            config=cfg.model_dump(mode="json"),
            notes=notes,
        )
        report_path = write_report(data, out / "report.html")
        summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        details_path = atomic_write_text(out / "details.json", json.dumps(details, indent=2, default=str))
        config_json = atomic_write_text(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
        mlflow.log_params(dict(list(_flat_params(cfg.model_dump(mode="json")).items())[:500]))
        mlflow.set_tags({
            "training_run_ids": ",".join(training.get("training_run_ids", [])),
            **{f"champion.{o.inputs.asset}": f"{o.inputs.champion.get('model_key')} v{o.inputs.champion.get('model_version')}"
               for o in outcomes.values()},
        })
        metrics = flatten_metrics({"assets": summary["assets"], "comparison": summary["comparison"]})
        mlflow.log_metrics({k.replace("<", "").replace(">", ""): v for k, v in metrics.items()})
        for p in (summary_path, details_path, report_path, config_json):
            mlflow.log_artifact(str(p))
        if config_path is not None and Path(config_path).is_file():
            mlflow.log_artifact(str(config_path), artifact_path="config")
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
    return RunOutput(out, summary, summary_path, report_path, details_path, run_id, uri, time.perf_counter() - t0)
