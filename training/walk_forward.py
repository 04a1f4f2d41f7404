"""Walk-forward training: fit on the past, forecast the next block one origin at a time, refit on schedule.

For one asset and one model specification :func:`walk_forward` produces a ``VolatilityForecast`` with one
row per origin (every bar from ``min_train - 1`` to the last bar, before and after the cut), per-fold
records (fit time, fallbacks) and the proxy targets aligned with the forecast table.

Schedule (all in bars of the feature frame, origin ``t`` = the last bar seen):

* Folds are blocks of ``test_block`` consecutive origins, split at the cut so that no fold straddles it.
  A fold is *pre-cut* when its origins lie before the cut; only pre-cut folds ever influence a choice.
* At each fold start the model is refitted on the training window (expanding: bars ``0..t``; rolling: the
  last ``window_size`` bars) minus the last ``purge`` bars, which are then filtered with ``update``.
  Inside a fold it is refitted every ``refit_every`` origins; between refits it only filters the new
  bar (``update``), so every forecast uses bars up to its origin and nothing after it.
* A refit that raises keeps the previous parameters (counted as a fallback, logged); the models' own
  convergence fallbacks (``n_fallbacks_`` / ``fallback_``) are counted as well.

:func:`run_tasks` fans (asset, model) tasks out through an executor and returns results to the driver;
workers never log to MLflow. An executor is any object with ``map_unordered(fn, tasks)`` (the
:class:`TaskExecutor` protocol): the job layer passes ``volmargin.executor.Executor`` (local processes or
Ray); the default is :class:`SerialExecutor`, in process and in order. training/ never imports volmargin/.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from models.base import Forecaster, VolatilityForecast, get_forecaster
from training.metrics import aligned_targets, proxy_variance

__all__ = [
    "Fold",
    "FoldRecord",
    "WalkForwardTask",
    "WalkForwardResult",
    "make_folds",
    "walk_forward",
    "run_task",
    "TaskFailure",
    "run_tasks",
    "cut_timestamp",
    "TaskExecutor",
    "SerialExecutor",
]

log = logging.getLogger(__name__)


def cut_timestamp(cut: dt.date | str | pd.Timestamp) -> pd.Timestamp:
    """Cut as a UTC timestamp at midnight."""
    t = pd.Timestamp(cut)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class Fold:
    """Origins ``[start, end)`` (bar positions) of one fold, trained on bars ``[train_start, start]``."""

    index: int
    start: int
    end: int
    train_start: int
    post_cut: bool


@dataclass(frozen=True)
class FoldRecord:
    """What happened in one fold (times UTC, durations in seconds)."""

    fold: int
    post_cut: bool
    train_start: str
    train_end: str
    test_start: str
    test_end: str
    n_origins: int
    n_refits: int
    fit_seconds: float
    fallbacks: int
    diagnostics: dict[str, int] = field(default_factory=dict)
    """Increments during the fold of the model's own counters (``Forecaster.diagnostics()`` where the model
    has it: e.g. rejected estimates, clipped or floored forecast values, starting-value warnings)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_folds(
    n_bars: int,
    *,
    min_train: int,
    block: int,
    cut_pos: int,
    window: str = "expanding",
    window_size: int | None = None,
) -> list[Fold]:
    """Walk-forward folds over origins ``min_train - 1 .. n_bars - 1``.

    Parameters
    ----------
    n_bars : int
        Bars in the frame.
    min_train : int
        Bars in the first training window.
    block : int
        Origins per fold.
    cut_pos : int
        First bar position at or after the cut (``n_bars`` if the cut lies beyond the data); folds are
        split there and tagged ``post_cut`` from there on.
    window, window_size
        ``expanding`` trains from bar 0; ``rolling`` on the last ``window_size`` bars up to the origin.
    """
    if min_train < 2:
        raise ValueError(f"min_train must be >= 2, got {min_train}")
    if n_bars < min_train:
        raise ValueError(f"the data has {n_bars} bars, fewer than min_train={min_train}")
    if block < 1:
        raise ValueError(f"test block must be >= 1, got {block}")
    size = window_size or min_train
    folds: list[Fold] = []
    start = min_train - 1
    while start < n_bars:
        end = min(start + block, n_bars)
        if start < cut_pos < end:
            end = cut_pos
        train_start = 0 if window == "expanding" else max(0, start + 1 - size)
        folds.append(Fold(len(folds), start, end, train_start, post_cut=start >= cut_pos))
        start = end
    return folds


@dataclass(frozen=True)
class WalkForwardTask:
    """One (asset, model) unit of work, picklable for the executor."""

    asset: str
    frame: pd.DataFrame
    model_name: str
    model_key: str
    params: dict[str, Any]
    horizon: int
    cut: pd.Timestamp
    min_train: int
    refit_every: int
    block: int
    window: str = "expanding"
    window_size: int | None = None
    purge: int = 0
    embargo: int = 0
    proxy: str = "gk"
    seed: int = 0
    keep_model: bool = False


@dataclass(frozen=True)
class WalkForwardResult:
    """Walk-forward output for one (asset, model).

    Attributes
    ----------
    forecast : VolatilityForecast
        One row per origin, per-step variance (decimal log returns per bar).
    targets : pd.DataFrame
        Proxy aligned with the forecast: index = origins, columns ``y.1..y.H`` (NaN past the data).
    returns : pd.DataFrame
        Realized returns of the forecast bars, columns ``r.1..r.H`` (for VaR coverage).
    folds : list of FoldRecord
    final_model : Forecaster or None
        The model as fitted at the last origin (kept when the task asks for it, for registration).
    post_cut : np.ndarray
        Boolean per origin: True from the cut on.
    pre_cut : np.ndarray
        Boolean per origin: every target bar (``t+1 .. t+H``) lies before the cut (model selection uses
        these rows only).
    held_out : np.ndarray
        Boolean per origin: at least ``embargo`` bars after the cut (the held-out test rows).
    """

    asset: str
    model: str
    spec: dict[str, Any]
    forecast: VolatilityForecast
    targets: pd.DataFrame
    returns: pd.DataFrame
    folds: list[FoldRecord]
    post_cut: np.ndarray
    pre_cut: np.ndarray
    held_out: np.ndarray
    cut: pd.Timestamp
    proxy: str
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)
    final_model: Any = None

    @property
    def n_fallbacks(self) -> int:
        return int(sum(f.fallbacks for f in self.folds))

    @property
    def diagnostics(self) -> dict[str, int]:
        """The model's diagnostic counters summed over the folds (see :attr:`FoldRecord.diagnostics`)."""
        return _sum_counts(f.diagnostics for f in self.folds)

    def table(self) -> pd.DataFrame:
        """The saved walk-forward table: ``h.*`` forecasts (+ quantiles/regimes), ``y.*`` proxy, ``r.*``
        returns and the ``post_cut`` flag, indexed by origin (UTC)."""
        df = self.forecast.to_long_frame()
        df = pd.concat([df, self.targets, self.returns], axis=1)
        df["post_cut"] = self.post_cut
        df.index.name = "origin"
        return df


def _fallback_count(model: Forecaster) -> int:
    return int(getattr(model, "n_fallbacks_", 0) or 0)


def _model_counts(model: Forecaster) -> dict[str, int]:
    """The model's cumulative diagnostic counters (``diagnostics()``), or {} for models without them."""
    fn = getattr(model, "diagnostics", None)
    return {str(k): int(v) for k, v in fn().items()} if callable(fn) and model.is_fitted else {}


def _sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in parts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _refit(model: Forecaster, frame: pd.DataFrame, lo: int, hi: int, purge: int) -> tuple[Forecaster, float, int]:
    """Refit ``model`` in place on bars ``[lo, hi - purge)`` and filter bars up to ``hi``.

    The same instance is refitted so that models can warm-start from their last good parameters.
    Returns ``(model, seconds, fallbacks)``: a model's own convergence fallbacks (``n_fallbacks_``
    increments) plus one when the fit raised and the previous fitted state was kept.
    """
    before = _fallback_count(model)
    snapshot = copy.deepcopy(model) if model.is_fitted else None
    t0 = time.perf_counter()
    fit_end = hi - purge
    try:
        model.fit(frame.iloc[lo:fit_end])
        if fit_end < hi:
            model.update(frame.iloc[fit_end:hi])
        fb = max(0, _fallback_count(model) - before)
    except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError) as exc:
        if snapshot is None:
            raise
        log.warning(
            "%s fit on bars [%d, %d) failed (%s); keeping the previous parameters", model.name, lo, fit_end, exc
        )
        model = snapshot
        model.update(frame.iloc[lo:hi])
        fb = 1
    return model, time.perf_counter() - t0, fb


def walk_forward(task: WalkForwardTask, progress: Callable[[int, int], None] | None = None) -> WalkForwardResult:
    """Run the walk-forward for one (asset, model) task; see the module docstring for the schedule."""
    t_start = time.perf_counter()
    frame = task.frame
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise TypeError(f"{task.asset}: the feature frame must have a DatetimeIndex")
    n = len(frame)
    cut = cut_timestamp(task.cut)
    idx = frame.index if frame.index.tz is not None else frame.index.tz_localize("UTC")
    cut_pos = int(idx.searchsorted(cut))
    folds = make_folds(
        n, min_train=task.min_train, block=task.block, cut_pos=cut_pos, window=task.window, window_size=task.window_size
    )
    _seed_everything(task.seed)
    template = get_forecaster(task.model_name, **task.params)
    if "random_state" in template.get_params() and template.get_params()["random_state"] is None:
        template.set_params(random_state=task.seed)
    elif "seed" in template.get_params() and template.get_params()["seed"] is None:
        template.set_params(seed=task.seed)
    H = task.horizon
    parts: list[VolatilityForecast] = []
    records: list[FoldRecord] = []
    model: Forecaster = template.clone()
    for fold in folds:
        fit_s, fbs, refits = 0.0, 0, 0
        counts_before = _model_counts(model)
        for i in range(fold.start, fold.end):
            if i == fold.start or (i - fold.start) % task.refit_every == 0:
                lo = 0 if task.window == "expanding" else max(0, i + 1 - (task.window_size or task.min_train))
                model, secs, fb = _refit(model, frame, lo, i + 1, task.purge)
                fit_s += secs
                fbs += fb
                refits += 1
            else:
                model.update(frame.iloc[i : i + 1])
            try:
                parts.append(model.predict_variance(H))
            except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError) as exc:
                if not parts:
                    raise
                # a non-finite or failed forecast: carry the previous origin's forecast, counted and logged
                log.warning("%s %s: forecast at %s failed (%s); previous forecast carried", task.asset,
                            task.model_key, idx[i], exc)
                prev = parts[-1]
                parts.append(
                    VolatilityForecast(origins=pd.DatetimeIndex([frame.index[i]]), variance=prev.variance,
                                       model=prev.model, version=prev.version, quantiles=prev.quantiles,
                                       quantile_levels=prev.quantile_levels, regime_probs=prev.regime_probs,
                                       regime_names=prev.regime_names)
                )
                fbs += 1
        counts_after = _model_counts(model)
        # a refit that raised restores a snapshot whose counters are older: never count negatively
        counts = {k: max(0, v - counts_before.get(k, 0)) for k, v in counts_after.items()}
        records.append(
            FoldRecord(
                fold=fold.index,
                post_cut=fold.post_cut,
                train_start=str(idx[fold.train_start]),
                train_end=str(idx[fold.start]),
                test_start=str(idx[fold.start]),
                test_end=str(idx[fold.end - 1]),
                n_origins=fold.end - fold.start,
                n_refits=refits,
                fit_seconds=fit_s,
                fallbacks=fbs,
                diagnostics={k: v for k, v in counts.items() if v},
            )
        )
        if progress is not None:
            progress(fold.index + 1, len(folds))
    totals = _sum_counts(r.diagnostics for r in records)
    if totals:
        log.warning("%s %s: model diagnostics over the walk-forward: %s", task.asset, task.model_key,
                    ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    forecast = VolatilityForecast.stack(parts)
    forecast = VolatilityForecast(
        origins=forecast.origins,
        variance=forecast.variance,
        model=task.model_key,
        version=template.spec_hash(),
        quantiles=forecast.quantiles,
        quantile_levels=forecast.quantile_levels,
        regime_probs=forecast.regime_probs,
        regime_names=forecast.regime_names,
        std_resid=forecast.std_resid,
    )
    proxy = proxy_variance(frame, task.proxy)
    proxy.index = idx
    y = aligned_targets(proxy, forecast.origins, H)
    ret = frame["ret"].astype(float).copy()
    ret.index = idx
    r = aligned_targets_raw(ret, forecast.origins, H)
    targets = pd.DataFrame(y, index=forecast.origins, columns=[f"y.{k}" for k in range(1, H + 1)])
    returns = pd.DataFrame(r, index=forecast.origins, columns=[f"r.{k}" for k in range(1, H + 1)])
    post_cut = np.asarray(forecast.origins >= cut)
    pos = idx.get_indexer(forecast.origins)
    pre_cut = pos + H < cut_pos
    held_out = pos >= cut_pos + task.embargo
    spec = {"name": task.model_name, "key": task.model_key, "params": dict(task.params), "version": template.spec_hash()}
    return WalkForwardResult(
        asset=task.asset,
        model=task.model_key,
        spec=spec,
        forecast=forecast,
        targets=targets,
        returns=returns,
        folds=records,
        post_cut=post_cut,
        pre_cut=pre_cut,
        held_out=held_out,
        cut=cut,
        proxy=task.proxy,
        seconds=time.perf_counter() - t_start,
        meta={"n_bars": n, "cut_pos": cut_pos, "model_repr": repr(template)},
        final_model=model if task.keep_model else None,
    )


def aligned_targets_raw(series: pd.Series, origins: pd.DatetimeIndex, horizon: int) -> np.ndarray:
    """Like :func:`training.metrics.aligned_targets` for any per-bar series (no floor, signs kept)."""
    return aligned_targets(series, origins, horizon)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - legacy global state some libraries still read
    try:
        import torch

        torch.manual_seed(seed)
    except Exception:  # pragma: no cover
        pass


@dataclass(frozen=True)
class TaskFailure:
    """A walk-forward task that raised: reported by the job, never silently dropped."""

    asset: str
    model: str
    error: str


def run_task(task: WalkForwardTask) -> WalkForwardResult | TaskFailure:
    """Executor entry point (module-level so that it pickles); an exception becomes a ``TaskFailure``."""
    try:
        return walk_forward(task)
    except Exception as exc:  # one failed model must not sink the other (asset, model) tasks
        log.exception("walk-forward %s / %s failed", task.asset, task.model_key)
        return TaskFailure(task.asset, task.model_key, f"{type(exc).__name__}: {exc}")


@runtime_checkable
class TaskExecutor(Protocol):
    """What training needs from an executor: ``volmargin.executor.Executor`` is one (local processes, Ray).

    ``map_unordered(fn, tasks)`` yields ``(index, fn(tasks[index]))`` for every task, in any order. ``fn`` is
    a module-level function and the tasks are picklable, so an implementation may run them in other
    processes or machines; it must return every result to the caller (workers never write to MLflow).
    """

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


@dataclass(frozen=True)
class SerialExecutor:
    """The default :class:`TaskExecutor`: every task in this process, in order."""

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, t in enumerate(tasks):
            yield i, fn(t)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        """Results in task order."""
        return [fn(t) for t in tasks]


def check_executor(executor: Any) -> TaskExecutor:
    """``executor`` itself when it has a callable ``map_unordered``, :class:`SerialExecutor` for None."""
    if executor is None:
        return SerialExecutor()
    if not isinstance(executor, TaskExecutor) or not callable(executor.map_unordered):
        raise TypeError(
            f"executor must have a map_unordered(fn, tasks) method (e.g. volmargin.executor.Executor or "
            f"training.walk_forward.SerialExecutor), got {type(executor).__name__}"
        )
    return executor


def run_tasks(
    tasks: Sequence[WalkForwardTask], executor: TaskExecutor | None = None
) -> Iterator[tuple[int, WalkForwardResult | TaskFailure]]:
    """Run tasks through ``executor.map_unordered`` (:class:`SerialExecutor` when None); yields
    ``(task index, result)`` as they finish."""
    yield from check_executor(executor).map_unordered(run_task, list(tasks))
