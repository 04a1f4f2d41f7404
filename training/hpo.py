"""Hyperparameter search for a forecaster (the neural ones first): Ray Tune, or Optuna locally.

What a trial is
    One parameter set of ``settings.model`` run through the walk-forward on the bars BEFORE the cut
    only (the frame is cut there before any task is built, so held-out bars cannot reach a trial). Its
    score is the pre-cut QLIKE over every horizon step, the number the promotion gate reads
    (``evaluation.models[key].pre_cut.qlike`` of :func:`training.job.run_training`): origins whose
    targets all lie before the cut, forecasts made from bars up to the origin, refitted on the
    walk-forward schedule. A trial that raises is recorded as failed with its error.

Where trials run
    ``engine="optuna"``: an Optuna study (TPE or random sampler, seeded) asks ``concurrent`` trials at a
    time and runs them through the executor it is given (any ``map_unordered(fn, tasks)``: in process,
    local processes, Ray). ``engine="tune"``: a Ray Tune ``Tuner`` on the Ray instance this process is
    connected to, with the same Optuna sampler as its search algorithm (``OptunaSearch``) and at most
    ``concurrent`` trials at once. Points in ``points_to_evaluate`` are evaluated first by both engines.

What is logged, and by whom
    Only this driver writes to MLflow: a parent run ``<name>/search`` (tag ``job=hpo``) with one nested
    run per trial (sampled parameters, score, fold scores, seconds, state). Workers and Tune trials only
    return numbers.

What happens to the best configuration
    It becomes a model specification (label ``<model key>-hpo``) and goes through the training job
    (:func:`training.job.run_training`: full walk-forward, pre-cut evaluation, registration and the
    existing promotion gate of :mod:`training.registry`) together with the dataset's current champion
    when there is one, so it is registered as ``challenger`` (or promoted, if it passes the gate) exactly
    as a hand-written specification would be. If the champion still has the lower pre-cut QLIKE, the
    gate re-confirms it and the searched configuration is not registered (the decision says so).

    The searched configuration was chosen as the best of ``k`` trials on the same pre-cut origins the gate's
    Diebold-Mariano test then uses, so that p-value alone is optimistic. When there is a champion, the gate
    also needs Hansen's (2005) SPA test of all ``k`` completed trials against it (:func:`selection_test`,
    ``arch.bootstrap.SPA``; the champion scored by the trials' own walk-forward) below ``dm_alpha``: a search
    is credited with beating the champion only if the best of everything it tried does so beyond what the
    search alone would produce. The held-out evaluation is unaffected either way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from training.config import (
    DEFAULT_CUTS,
    ModelSpec,
    PromotionConfig,
    StrictModel,
    TrainSettings,
    WalkForwardConfig,
)
from training.evaluation import row_losses
from training.metrics import qlike
from training.walk_forward import TaskExecutor, WalkForwardTask, check_executor, cut_timestamp, walk_forward

__all__ = [
    "SearchParam",
    "HpoSettings",
    "TrialTask",
    "TrialResult",
    "SearchResult",
    "train_window",
    "evaluate_trial",
    "run_search",
    "promote_best",
]

log = logging.getLogger(__name__)

Engine = Literal["optuna", "tune"]
METRIC = "qlike_pre_cut"


# ---------------------------------------------------------------------------- settings
class SearchParam(StrictModel):
    """One searched parameter: ``int`` or ``float`` in ``[low, high]`` (``log`` scale optional), or ``categorical``."""

    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes 'choices', not 'low'/'high'")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"an {self.type} parameter needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale parameter needs low > 0, got {self.low}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int parameter needs integer bounds, got low={self.low}, high={self.high}")
        return self

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the parameter's domain (for ``points_to_evaluate``)."""
        if self.type == "categorical":
            return value in (self.choices or [])
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and value != int(value):
            return False
        return float(self.low) <= float(value) <= float(self.high)  # type: ignore[arg-type]


class HpoSettings(StrictModel):
    """Settings of a hyperparameter search (``configs/hpo.yaml``; ``volmargin train --hpo`` adds the executor).

    Parameters
    ----------
    name : str
        MLflow experiment (the search run and the promotion job's run go there).
    dataset : str
        Dataset id (``bundled:bitstamp/BTC`` ...).
    cut : date, optional
        Trials see only bars before it; default per dataset (:data:`training.config.DEFAULT_CUTS`).
    horizon, proxy, seed, walk_forward
        As in :class:`training.config.TrainSettings`; trials use the same walk-forward schedule as the
        promotion job, ``model.refit_every`` overriding ``walk_forward.refit_every``.
    model : ModelSpec
        The model searched (e.g. ``gru``) and its fixed parameters; sampled ones override them.
    search_space : dict of str to SearchParam
        Parameters searched, by constructor keyword of the model.
    n_trials : int
        Trials in all (``points_to_evaluate`` included).
    sampler : {"tpe", "random"}
        Optuna sampler (seeded with ``seed``), used by both engines.
    points_to_evaluate : list of dict
        Parameter sets evaluated first (e.g. the current defaults), each inside the search space.
    concurrent : int
        Trials run at once (Optuna batch size; Tune's ``max_concurrent_trials``).
    var_levels, promotion, tracking_uri, allow_file_store, artifacts_dir
        Passed to the promotion job.
    """

    name: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    cut: dt.date | None = None
    horizon: int = Field(default=1, ge=1, le=250)
    proxy: Literal["gk", "sq", "rv"] = "gk"
    seed: int = 0
    walk_forward: WalkForwardConfig = Field(default_factory=WalkForwardConfig)
    model: ModelSpec
    search_space: dict[str, SearchParam] = Field(min_length=1)
    n_trials: int = Field(default=20, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    concurrent: int = Field(default=1, ge=1)
    var_levels: list[float] = Field(default_factory=lambda: [0.95, 0.99])
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    tracking_uri: str | None = None
    allow_file_store: bool = False
    artifacts_dir: str = "artifacts"

    @model_validator(mode="after")
    def _check(self) -> HpoSettings:
        from models.base import get_forecaster

        try:
            known = set(get_forecaster(self.model.name, **self.model.params).get_params())
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"model: {exc}") from None
        unknown = sorted(set(self.search_space) - known)
        if unknown:
            raise ValueError(f"search_space keys {unknown} are not parameters of model {self.model.name!r}; "
                             f"known: {sorted(known)}")
        for i, point in enumerate(self.points_to_evaluate):
            if set(point) != set(self.search_space):
                raise ValueError(f"points_to_evaluate.{i} must set exactly the searched parameters "
                                 f"{sorted(self.search_space)}, got {sorted(point)}")
            for k, v in point.items():
                if not self.search_space[k].contains(v):
                    raise ValueError(f"points_to_evaluate.{i}.{k} = {v!r} is outside the search space")
        if len(self.points_to_evaluate) > self.n_trials:
            raise ValueError(f"n_trials ({self.n_trials}) must be >= the {len(self.points_to_evaluate)} "
                             "points_to_evaluate")
        if self.cut is None and self.dataset not in DEFAULT_CUTS:
            raise ValueError(f"no default cut for dataset {self.dataset!r}; set 'cut' (a date)")
        return self

    @property
    def cut_date(self) -> dt.date:
        return self.cut if self.cut is not None else DEFAULT_CUTS[self.dataset]

    @property
    def searched_key(self) -> str:
        """Model key of the searched configuration in the promotion job."""
        return f"{self.model.key}-hpo"


# ---------------------------------------------------------------------------- one trial
@dataclass(frozen=True)
class TrialTask:
    """One trial, picklable: the pre-cut frame, the model and the trial's parameters."""

    number: int
    frame: pd.DataFrame
    model_name: str
    model_key: str
    params: dict[str, Any]
    horizon: int
    cut: pd.Timestamp
    walk_forward: dict[str, Any]
    refit_every: int
    proxy: str
    seed: int


@dataclass(frozen=True)
class TrialResult:
    """Score of one trial (``score`` is NaN when it failed; ``error`` says why)."""

    number: int
    params: dict[str, Any]
    score: float
    fold_scores: list[float] = field(default_factory=list)
    n_origins: int = 0
    fallbacks: int = 0
    seconds: float = 0.0
    error: str | None = None
    origins: list[str] = field(default_factory=list)  # pre-cut forecast origins (ISO, UTC) ...
    losses: list[float] = field(default_factory=list)  # ... and the QLIKE at each (mean over horizon steps)

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.score)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_window(frame: pd.DataFrame, cut: dt.date | str | pd.Timestamp) -> pd.DataFrame:
    """Bars strictly before ``cut`` (UTC): everything a trial may see."""
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise TypeError(f"the feature frame must have a DatetimeIndex, got {type(frame.index).__name__}")
    idx = frame.index if frame.index.tz is not None else frame.index.tz_localize("UTC")
    return frame.iloc[: int(idx.searchsorted(cut_timestamp(cut)))]


def evaluate_trial(task: TrialTask) -> TrialResult:
    """Walk-forward of one parameter set on the pre-cut frame; executor entry point (never raises)."""
    t0 = time.perf_counter()
    wf = task.walk_forward
    try:
        res = walk_forward(WalkForwardTask(
            asset="hpo", frame=task.frame, model_name=task.model_name, model_key=task.model_key,
            params=dict(task.params), horizon=task.horizon, cut=task.cut, min_train=wf["min_train"],
            refit_every=task.refit_every, block=wf["test_block"] or task.refit_every, window=wf["window"],
            window_size=(wf["window_size"] or wf["min_train"]) if wf["window"] == "rolling" else None,
            purge=wf["purge"], embargo=wf["embargo"], proxy=task.proxy, seed=task.seed,
        ))
        y = res.targets.to_numpy(dtype=float)
        f = np.asarray(res.forecast.variance)
        mask = np.asarray(res.pre_cut, dtype=bool)
        score = float(qlike(y[mask].ravel(), f[mask].ravel()))
        folds, start = [], 0
        for rec in res.folds:
            sel = np.zeros(len(mask), dtype=bool)
            sel[start : start + rec.n_origins] = True
            start += rec.n_origins
            sel &= mask
            folds.append(float(qlike(y[sel].ravel(), f[sel].ravel())) if sel.any() else float("nan"))
        per_origin = row_losses(res, "pre_cut")  # the series the gate's Diebold-Mariano test reads
        return TrialResult(task.number, dict(task.params), score, folds, int(mask.sum()), res.n_fallbacks,
                           time.perf_counter() - t0, origins=[t.isoformat() for t in per_origin.index],
                           losses=[float(v) for v in per_origin.to_numpy()])
    except Exception as exc:  # one bad parameter set must not end the search
        log.warning("trial %d (%s) failed: %s: %s", task.number, task.params, type(exc).__name__, exc)
        return TrialResult(task.number, dict(task.params), float("nan"), seconds=time.perf_counter() - t0,
                           error=f"{type(exc).__name__}: {exc}")


def _tune_trainable(config: dict[str, Any], base: TrialTask) -> None:
    """Ray Tune function trainable: one trial, its result returned to the driver."""
    from ray import tune  # type: ignore[import-not-found]

    try:  # one BLAS/torch thread per trial, as in the executor's workers
        import torch
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass
    params = {**base.params, **config}
    res = evaluate_trial(TrialTask(**{**asdict_shallow(base), "params": params}))
    tune.report({METRIC: res.score if res.ok else float("nan"), "result": json.dumps(res.to_dict(), default=str)})


def asdict_shallow(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict without copying them (``dataclasses.asdict`` deep-copies frames)."""
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


# ---------------------------------------------------------------------------- search
@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`run_search` (and of :func:`promote_best` when it ran)."""

    engine: str
    trials: list[TrialResult]
    best: TrialResult
    best_params: dict[str, Any]
    search_run_id: str | None
    tracking_uri: str | None
    promotion: dict[str, Any] | None = None

    def table(self) -> pd.DataFrame:
        rows = [{"trial": t.number, **{f"param.{k}": v for k, v in t.params.items()}, METRIC: t.score,
                 "seconds": t.seconds, "error": t.error} for t in self.trials]
        return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError("the hyperparameter search needs the 'optuna' package, which is not installed; "
                         "install it with `pip install volmargin[distributed]`") from None
    return optuna


def _sampler(settings: HpoSettings) -> Any:
    optuna = _import_optuna()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def _optuna_distributions(space: Mapping[str, SearchParam]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for k, p in space.items():
        if p.type == "categorical":
            out[k] = CategoricalDistribution(list(p.choices or []))
        elif p.type == "int":
            out[k] = IntDistribution(int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
        else:
            out[k] = FloatDistribution(float(p.low), float(p.high), log=p.log)  # type: ignore[arg-type]
    return out


def _base_task(settings: HpoSettings, frame: pd.DataFrame) -> TrialTask:
    pre = train_window(frame, settings.cut_date)
    wf = settings.walk_forward
    if len(pre) <= wf.min_train + settings.horizon:
        raise ValueError(f"{settings.dataset}: {len(pre)} bars before the cut {settings.cut_date}, too few for "
                         f"walk_forward.min_train={wf.min_train} and horizon={settings.horizon}")
    return TrialTask(number=-1, frame=pre, model_name=settings.model.name, model_key=settings.model.key,
                     params=dict(settings.model.params), horizon=settings.horizon,
                     cut=cut_timestamp(settings.cut_date), walk_forward=wf.model_dump(),
                     refit_every=settings.model.refit_every or wf.refit_every, proxy=settings.proxy,
                     seed=settings.seed)


def _search_optuna(settings: HpoSettings, base: TrialTask, executor: TaskExecutor,
                   on_trial: Callable[[TrialResult], None]) -> list[TrialResult]:
    optuna = _import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=_sampler(settings))
    for point in settings.points_to_evaluate:
        study.enqueue_trial(dict(point))
    dists = _optuna_distributions(settings.search_space)
    results: list[TrialResult] = []
    while len(results) < settings.n_trials:
        batch = [study.ask(dists) for _ in range(min(settings.concurrent, settings.n_trials - len(results)))]
        tasks = [TrialTask(**{**asdict_shallow(base), "number": tr.number, "params": {**base.params, **tr.params}})
                 for tr in batch]
        done: dict[int, TrialResult] = {}
        for i, res in executor.map_unordered(evaluate_trial, tasks):
            done[i] = res
        for i, tr in enumerate(batch):
            res = _only_searched(done[i], settings)
            if res.ok:
                study.tell(tr, res.score)
            else:
                study.tell(tr, state=optuna.trial.TrialState.FAIL)
            results.append(res)
            on_trial(res)
    return results


def _only_searched(res: TrialResult, settings: HpoSettings) -> TrialResult:
    """The result with ``params`` restricted to the searched keys (fixed ones are the model's)."""
    return TrialResult(**{**asdict_shallow(res), "params": {k: res.params[k] for k in settings.search_space}})


def _tune_space(space: Mapping[str, SearchParam]) -> dict[str, Any]:
    from ray import tune  # type: ignore[import-not-found]

    out: dict[str, Any] = {}
    for k, p in space.items():
        if p.type == "categorical":
            out[k] = tune.choice(list(p.choices or []))
        elif p.type == "int":  # Tune's randint excludes the upper bound
            lo, hi = int(p.low), int(p.high) + 1  # type: ignore[arg-type]
            out[k] = tune.lograndint(lo, hi) if p.log else tune.randint(lo, hi)
        else:
            out[k] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


def _search_tune(settings: HpoSettings, base: TrialTask, storage: Path,
                 on_trial: Callable[[TrialResult], None]) -> list[TrialResult]:
    try:
        import ray  # type: ignore[import-not-found]
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ValueError("engine 'tune' needs 'ray[tune]' and 'optuna', which are not installed; install them "
                         "with `pip install volmargin[distributed]`") from None
    if not ray.is_initialized():
        raise ValueError("engine 'tune' needs a running Ray connection; call ray.init(...) or use "
                         "volmargin.executor.Executor(backend='ray', address=...).connect() first")
    searcher = OptunaSearch(metric=METRIC, mode="min", sampler=_sampler(settings),
                            points_to_evaluate=[dict(p) for p in settings.points_to_evaluate] or None)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_tune_trainable, base=base), {"cpu": 1}),
        param_space=_tune_space(settings.search_space),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=settings.n_trials,
                                    max_concurrent_trials=settings.concurrent),
        run_config=tune.RunConfig(name=f"{settings.name}-{int(time.time())}", storage_path=str(storage.resolve()),
                                  verbose=0),
    )
    grid = tuner.fit()
    results: list[TrialResult] = []
    for n, r in enumerate(grid):
        payload = (r.metrics or {}).get("result")
        if payload is not None:
            d = json.loads(payload)
            d["number"] = n
            res = TrialResult(**d)
        else:
            cfg = {k: (r.config or {}).get(k) for k in settings.search_space}
            res = TrialResult(n, cfg, float("nan"), error=f"Tune trial failed: {r.error}")
        res = _only_searched(res, settings)
        results.append(res)
        on_trial(res)
    return results


# ---------------------------------------------------------------------------- tracking (driver only)
class _SearchTracker:
    """The search's MLflow parent run and one nested run per trial, written by the driver."""

    def __init__(self, settings: HpoSettings, engine: str, tracking_uri: str) -> None:
        import mlflow

        from training.tracking import use_experiment

        self.mlflow = mlflow
        use_experiment(settings.name, tracking_uri)
        run = mlflow.start_run(run_name=f"{settings.name}/search", tags={"job": "hpo", "engine": engine,
                                                                          "dataset": settings.dataset})
        self.run_id = run.info.run_id
        mlflow.log_params({"dataset": settings.dataset, "cut": str(settings.cut_date), "model": settings.model.name,
                           "model_params": json.dumps(settings.model.params, sort_keys=True, default=str),
                           "search_space": json.dumps({k: v.model_dump() for k, v in settings.search_space.items()},
                                                      sort_keys=True)[:6000],
                           "n_trials": settings.n_trials, "sampler": settings.sampler, "seed": settings.seed,
                           "concurrent": settings.concurrent, "engine": engine})

    def trial(self, res: TrialResult) -> None:
        mlflow = self.mlflow
        with mlflow.start_run(run_name=f"trial-{res.number:03d}", nested=True,
                              tags={"trial": str(res.number), "state": "COMPLETE" if res.ok else "FAIL"}):
            mlflow.log_params({k: json.dumps(v) if not isinstance(v, str) else v for k, v in res.params.items()})
            metrics = {"seconds": res.seconds, "fallbacks": float(res.fallbacks), "n_origins": float(res.n_origins)}
            if res.ok:
                metrics[METRIC] = res.score
            mlflow.log_metrics(metrics)
            for step, v in enumerate(res.fold_scores):
                if math.isfinite(v):
                    mlflow.log_metric("fold_qlike", v, step=step)
            if res.error:
                mlflow.set_tag("error", res.error[:5000])

    def finish(self, best: TrialResult | None, status: str) -> None:
        mlflow = self.mlflow
        if best is not None:
            mlflow.log_metric(f"best_{METRIC}", best.score)
            mlflow.log_params({f"best.{k}": json.dumps(v) for k, v in best.params.items()})
            mlflow.set_tag("best_trial", str(best.number))
        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)


def run_search(settings: HpoSettings, frame: pd.DataFrame, *, engine: Engine = "optuna",
               executor: TaskExecutor | None = None, tracking_uri: str | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Search ``settings.search_space`` on the bars of ``frame`` before the cut; log every trial.

    Parameters
    ----------
    settings : HpoSettings
    frame : pd.DataFrame
        The dataset's feature frame (all of it: the search cuts it at ``settings.cut``).
    engine : {"optuna", "tune"}
        Optuna ask/tell through ``executor``, or Ray Tune on the Ray instance this process is connected to.
    executor : TaskExecutor, optional
        Runs Optuna's trials (default: in this process). Not used by Tune.
    tracking_uri : str, optional
        Resolved MLflow URI; None logs nothing (library use, tests of the search alone).
    progress : callable, optional
        ``(stage, done, total)`` with stage ``"trials"``.

    Returns
    -------
    SearchResult
        Every trial (in the order they were numbered), the best one (lowest pre-cut QLIKE).

    Raises
    ------
    RuntimeError
        Every trial failed.
    """
    if engine not in ("optuna", "tune"):
        raise ValueError(f"engine must be 'optuna' or 'tune', got {engine!r}")
    base = _base_task(settings, frame)
    tracker = _SearchTracker(settings, engine, tracking_uri) if tracking_uri else None
    count = [0]

    def on_trial(res: TrialResult) -> None:
        count[0] += 1
        if tracker is not None:
            tracker.trial(res)
        if progress is not None:
            progress("trials", count[0], settings.n_trials)

    status, best = "FAILED", None
    try:
        if engine == "optuna":
            trials = _search_optuna(settings, base, check_executor(executor), on_trial)
        else:
            trials = _search_tune(settings, base, Path(settings.artifacts_dir) / "hpo" / "tune", on_trial)
        ok = [t for t in trials if t.ok]
        if not ok:
            raise RuntimeError(f"every one of the {len(trials)} trials failed; first error: {trials[0].error}")
        best = min(ok, key=lambda t: (t.score, t.number))
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(best, status)
    return SearchResult(engine, sorted(trials, key=lambda t: t.number), best, dict(best.params),
                        tracker.run_id if tracker else None, tracking_uri)


# ---------------------------------------------------------------------------- promotion
def _champion_spec(settings: HpoSettings, tracking_uri: str) -> ModelSpec | None:
    """The dataset's current champion as a model specification (None without one)."""
    from training.registry import _alias_version, _client, registered_name

    try:
        mv = _alias_version(_client(tracking_uri), registered_name(settings.dataset), "champion")
    except Exception:  # no registry yet
        return None
    if mv is None:
        return None
    spec = json.loads(mv.tags.get("spec", "{}"))
    if not spec.get("name"):
        return None
    return ModelSpec(name=spec["name"], params=dict(spec.get("params", {})), label=spec.get("key"))


def selection_test(settings: HpoSettings, search: SearchResult, champion: ModelSpec,
                   frame: pd.DataFrame) -> dict[str, Any]:
    """Hansen's SPA test of every completed trial against the champion on the pre-cut origins: the p-value the
    gate needs for a configuration chosen as the best of a search (the Diebold-Mariano p-value of the best
    trial alone ignores that it was the best of ``k``). The champion is scored by the trials' own walk-forward
    (same schedule, same origins); a search without per-origin losses gives ``pvalue`` None (the gate refuses).
    """
    from training.tests import superior_predictive_ability

    ok = [t for t in search.trials if t.ok and t.losses]
    out: dict[str, Any] = {"test": "Hansen (2005) SPA, consistent p-value, stationary bootstrap",
                           "benchmark": champion.key, "trials": len(ok), "pvalue": None}
    if not ok:  # nothing to test: no walk-forward of the champion either
        out["error"] = "no completed trial with per-origin losses"
        return out
    base = _base_task(settings, frame)
    bench = evaluate_trial(TrialTask(**{**asdict_shallow(base), "model_name": champion.name,
                                        "model_key": champion.key, "params": dict(champion.params),
                                        "refit_every": champion.refit_every or base.refit_every}))
    if not bench.ok:
        out["error"] = bench.error
        return out

    def series(t: TrialResult) -> pd.Series:
        return pd.Series(t.losses, index=pd.DatetimeIndex(t.origins))

    cands = pd.DataFrame({f"trial-{t.number:03d}": series(t) for t in ok})
    try:
        res = superior_predictive_ability(series(bench), cands, reps=settings.promotion.spa_reps,
                                          seed=settings.seed)
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    out.update(pvalue=res.pvalue, pvalue_lower=res.pvalue_lower, pvalue_upper=res.pvalue_upper, origins=res.n,
               best_by_mean_loss=res.best, reps=res.reps, seed=res.seed)
    return out


def promote_best(settings: HpoSettings, search: SearchResult, frame: pd.DataFrame, *,
                 executor: TaskExecutor | None = None, label: str = "",
                 progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Put the best configuration through the training job and the promotion gate (with the champion).

    Returns ``search`` with ``promotion`` set: the job's run id, evaluation path and the gate's decision
    for the dataset. ``label`` is the asset label given to the job's loader.
    """
    from training.job import run_training
    from training.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri, allow_file_store=settings.allow_file_store)
    best = ModelSpec(name=settings.model.name, params={**settings.model.params, **search.best_params},
                     label=settings.searched_key, refit_every=settings.model.refit_every)
    models = [best]
    champ = _champion_spec(settings, uri)
    if champ is not None and champ.key != best.key:
        models.insert(0, champ)
    train = TrainSettings(
        name=settings.name, seed=settings.seed, datasets=[settings.dataset], cut=settings.cut_date,
        horizon=settings.horizon, walk_forward=settings.walk_forward, models=models, proxy=settings.proxy,
        var_levels=settings.var_levels, tracking_uri=uri, allow_file_store=settings.allow_file_store,
        artifacts_dir=settings.artifacts_dir, promotion=settings.promotion,
    )
    selection = None
    if champ is not None and champ.key != best.key:
        selection = {best.key: selection_test(settings, search, champ, frame)}
    job = run_training(train, loader=lambda ds: (label or ds, frame), executor=executor, progress=progress,
                       selection=selection)
    ev = job.evaluation["assets"][settings.dataset]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if search.search_run_id:
        client.set_tag(search.search_run_id, "promotion_run_id", job.run_id)
        sel = (selection or {}).get(best.key) or {}
        if sel.get("pvalue") is not None:  # the search-wide test, next to the search's trials
            client.log_metric(search.search_run_id, "spa_pvalue_vs_champion", float(sel["pvalue"]))
            client.set_tag(search.search_run_id, "spa_benchmark", str(sel["benchmark"]))
    client.set_tag(job.run_id, "hpo_search_run_id", str(search.search_run_id))
    promo = {
        "run_id": job.run_id,
        "evaluation": str(job.evaluation_path),
        "models": [m.key for m in models],
        "searched_key": best.key,
        "pre_cut_qlike": {k: v["pre_cut"].get("qlike") for k, v in ev["models"].items()},
        "decision": ev.get("decision"),
        "selection_test": (selection or {}).get(best.key),
        "registered": bool(ev.get("decision") and ev["decision"].get("candidate") == best.key),
    }
    return SearchResult(search.engine, search.trials, search.best, search.best_params, search.search_run_id,
                        search.tracking_uri, promo)
