"""The training job behind ``volmargin train``: data → walk-forward → evaluation → MLflow → registry.

Only this driver writes to MLflow; walk-forward tasks run through the executor it is given (any
:class:`training.walk_forward.TaskExecutor`; the CLI and the end-to-end job build
``volmargin.executor.Executor`` from ``cfg.executor``) and return results. Without one they run in this
process (:class:`training.walk_forward.SerialExecutor`).
Outputs under ``<artifacts_dir>/train/<parent run id>/``: ``evaluation.json`` (also logged on the parent
run), ``held_out.csv``, ``forecasts/<asset>/<model>.parquet`` (the walk-forward tables the margin backtest
consumes) and ``plots/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from training.evaluation import evaluate_asset, held_out_table
from training.registry import best_candidate, register_and_promote
from training.tracking import TrainingTracker, atomic_write_text, resolve_tracking_uri
from training.walk_forward import (
    SerialExecutor,
    TaskExecutor,
    TaskFailure,
    WalkForwardResult,
    WalkForwardTask,
    check_executor,
    cut_timestamp,
    run_tasks,
)

__all__ = ["JobResult", "run_training", "load_features", "build_tasks"]

log = logging.getLogger(__name__)

Loader = Callable[[str], tuple[str, pd.DataFrame]]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class JobResult:
    """What a training job produced."""

    run_id: str
    out_dir: Path
    evaluation: dict[str, Any]
    evaluation_path: Path
    tracking_uri: str

    def held_out_table(self) -> pd.DataFrame:
        return held_out_table(self.evaluation)


def load_features(dataset: str) -> tuple[str, pd.DataFrame]:
    """Default loader: ``data_pipelines.pipeline.prepare_dataset`` → (asset label, feature frame)."""
    from data_pipelines.pipeline import prepare_dataset

    prepared = prepare_dataset(dataset, policy="repair")
    return prepared.asset, prepared.features


def build_tasks(cfg: Any, frames: dict[str, tuple[str, pd.DataFrame]]) -> list[WalkForwardTask]:
    """One walk-forward task per (dataset, model) of a ``TrainConfig``."""
    wf = cfg.walk_forward
    tasks = []
    for ds in cfg.datasets:
        _asset, frame = frames[ds]
        for spec in cfg.models:
            tasks.append(
                WalkForwardTask(
                    asset=ds,
                    frame=frame,
                    model_name=spec.name,
                    model_key=spec.key,
                    params=dict(spec.params),
                    horizon=cfg.horizon,
                    cut=cut_timestamp(cfg.cut_for(ds)),
                    min_train=wf.min_train,
                    refit_every=spec.refit_every or wf.refit_every,
                    block=wf.block,
                    window=wf.window,
                    window_size=wf.rolling_size if wf.window == "rolling" else None,
                    purge=wf.purge,
                    embargo=wf.embargo,
                    proxy=cfg.proxy,
                    seed=cfg.seed,
                    keep_model=cfg.promotion.register_models,
                )
            )
    return tasks


def _check_models(cfg: Any) -> None:
    from models.base import get_forecaster

    for i, spec in enumerate(cfg.models):
        try:
            get_forecaster(spec.name, **spec.params)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"models.{i} ({spec.key}): {exc}") from None


def run_training(
    cfg: Any,
    *,
    config_path: str | Path | None = None,
    loader: Loader | None = None,
    progress: Progress | None = None,
    executor: TaskExecutor | None = None,
    selection: Mapping[str, Mapping[str, Any]] | None = None,
) -> JobResult:
    """Run a training config end to end.

    Parameters
    ----------
    cfg : training.config.TrainSettings (or ``volmargin.config.TrainConfig``, which adds the executor)
        Validated config.
    config_path : path, optional
        Logged on the parent run.
    loader : callable, optional
        ``dataset id -> (asset label, feature frame)``; default :func:`load_features`.
    progress : callable, optional
        ``(stage, done, total)`` callbacks for a progress bar (stages: "walk-forward", "logging").
    executor : TaskExecutor, optional
        Runs the (asset, model) walk-forward tasks, e.g. ``volmargin.executor.make_executor(**cfg.executor)``;
        default: in this process, in order. ``cfg.executor`` is read by whoever builds the executor, not here.
    selection : mapping, optional
        Per model key, the selection test of a configuration found by a search, for the promotion gate
        (:func:`training.registry.decide`; :func:`training.hpo.promote_best` passes it).
    """
    _check_models(cfg)
    executor = check_executor(executor)
    ex_cfg = getattr(cfg, "executor", None)
    if type(executor) is SerialExecutor and ex_cfg is not None and (ex_cfg.workers > 1 or ex_cfg.backend != "local"):
        log.warning(
            "cfg.executor asks for backend=%s, workers=%d but no executor was passed to run_training; "
            "running the tasks serially in this process", ex_cfg.backend, ex_cfg.workers,
        )
    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    loader = loader or load_features
    frames = {ds: loader(ds) for ds in cfg.datasets}
    tasks = build_tasks(cfg, frames)

    tracker = TrainingTracker(cfg.name, uri)
    params = {
        "config": str(config_path) if config_path else "",
        "datasets": cfg.datasets,
        "models": [m.key for m in cfg.models],
        "horizon": cfg.horizon,
        "proxy": cfg.proxy,
        "seed": cfg.seed,
        "walk_forward": cfg.walk_forward.model_dump(),
        "cuts": {ds: str(cfg.cut_for(ds)) for ds in cfg.datasets},
    }
    run_id = tracker.start(run_name=cfg.name, params=params, tags={"job": "train"})
    out_dir = Path(cfg.artifacts_dir) / "train" / run_id
    status = "FAILED"
    try:
        if config_path:
            tracker.log_job_artifact(config_path, "config")
        results: dict[str, dict[str, WalkForwardResult]] = {ds: {} for ds in cfg.datasets}
        done = 0
        failures: dict[str, dict[str, str]] = {ds: {} for ds in cfg.datasets}
        for i, res in run_tasks(tasks, executor):
            done += 1
            if isinstance(res, TaskFailure):
                log.error("walk-forward %s / %s failed: %s", res.asset, res.model, res.error)
                failures[res.asset][res.model] = res.error
            else:
                results[tasks[i].asset][tasks[i].model_key] = res
                log.info("walk-forward %s / %s done in %.1fs", res.asset, res.model, res.seconds)
            if progress:
                progress("walk-forward", done, len(tasks))
        evaluation: dict[str, Any] = {
            "name": cfg.name,
            "parent_run_id": run_id,
            "config": params,
            "assets": {},
        }
        schedule = cfg.walk_forward.model_dump()
        for j, ds in enumerate(cfg.datasets):
            ordered = {m.key: results[ds][m.key] for m in cfg.models if m.key in results[ds]}
            if not ordered:
                raise RuntimeError(f"{ds}: every model failed: {failures[ds]}")
            ev = evaluate_asset(
                ordered,
                baselines={k: [b for b in cfg.baselines_for(k) if b in ordered] for k in ordered},
                var_levels=cfg.var_levels,
                mcs_size=cfg.promotion.mcs_size,
                mcs_reps=cfg.promotion.mcs_reps,
                seed=cfg.seed,
            )
            ev["asset_label"] = frames[ds][0]
            ev["failed"] = failures[ds]
            cand = best_candidate(ev, cfg.promotion.max_traffic_light)
            logged = tracker.log_asset(
                ds,
                ordered,
                ev,
                out_dir=out_dir,
                params={"dataset": ds, "cut": ev["cut"], "n_origins": ev["n_origins"]},
                fitted_models={k: r.final_model for k, r in ordered.items()},
                log_model_for=cand if cfg.promotion.register_models else None,
                example_bars=frames[ds][1].tail(5),
            )
            ev["forecast_tables"] = {k: v["forecast_table"] for k, v in logged["models"].items()}
            ev["runs"] = {k: v["run_id"] for k, v in logged["models"].items()}
            ev["best_pre_cut"] = cand
            if cfg.promotion.register_models:
                decision = register_and_promote(
                    ds,
                    ev,
                    logged,
                    tracking_uri=uri,
                    artifacts_dir=cfg.artifacts_dir,
                    parent_run_id=run_id,
                    schedule={**schedule, "horizon": cfg.horizon},
                    dm_alpha=cfg.promotion.dm_alpha,
                    max_traffic_light=cfg.promotion.max_traffic_light,
                    selection=selection,
                )
                ev["decision"] = decision.to_dict()
                ev["champion"] = decision.champion_after
                tracker.set_job_tags({f"champion.{ds}": str(decision.champion_after), f"promoted.{ds}": str(decision.promoted)})
            evaluation["assets"][ds] = ev
            if progress:
                progress("logging", j + 1, len(cfg.datasets))
        ev_path = atomic_write_text(out_dir / "evaluation.json", json.dumps(evaluation, indent=2, default=str))
        table = held_out_table(evaluation)
        csv_path = atomic_write_text(out_dir / "held_out.csv", table.to_csv(index=False))
        tracker.log_job_artifact(ev_path)
        tracker.log_job_artifact(csv_path)
        for d in evaluation["assets"].values():
            if d.get("decision"):
                p = atomic_write_text(
                    out_dir / "decisions" / f"{d['asset_label']}.json", json.dumps(d["decision"], indent=2, default=str)
                )
                tracker.log_job_artifact(p, "decisions")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return JobResult(run_id, out_dir, evaluation, ev_path, uri)
