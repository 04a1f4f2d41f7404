"""``volmargin train --config FILE``, ``volmargin hpo --config FILE`` and ``volmargin models list``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from volmargin.commands._common import console, stage_progress, user_errors

models_app = typer.Typer(no_args_is_help=True, help="Registered volatility models.")


def _table_console() -> Console:
    """The CLI console on a terminal; a 140-column one when output is piped (rich defaults to 80)."""
    return console if console.is_terminal else Console(width=140)


def _fmt(x: object, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else "–"
    return str(x)


RAY_ADDRESS_HELP = (
    "Run the tasks on Ray: a cluster address (auto, ray://head:10001) or 'local' for a Ray instance on this "
    "machine; sets executor.backend=ray. Needs the distributed extra: pip install 'volmargin\\[distributed]'."
)


def executor_override(ex_cfg: Any, workers: int | None, ray_address: str | None) -> Any:
    """``ExecutorConfig`` with the ``--workers`` / ``--ray-address`` overrides applied."""
    update: dict[str, Any] = {}
    if workers is not None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        update["workers"] = workers
    if ray_address is not None:
        if not ray_address.strip():
            raise ValueError("--ray-address must not be empty (e.g. auto, ray://head:10001 or local)")
        update.update(backend="ray", address=ray_address.strip())
    return ex_cfg.model_copy(update=update) if update else ex_cfg


@user_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="Training config (YAML), e.g. configs/train_btc.yaml."),
    workers: int | None = typer.Option(None, "--workers", help="Override executor.workers."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Walk-forward training and evaluation; logs to MLflow and writes artifacts/train/<run id>/evaluation.json."""
    from training.job import run_training
    from volmargin.config import load_config
    from volmargin.executor import make_executor

    cfg = load_config(config)
    cfg = cfg.model_copy(update={"executor": executor_override(cfg.executor, workers, ray_address)})
    with make_executor(cfg.executor.backend, cfg.executor.workers, cfg.executor.address) as ex, \
            stage_progress() as progress:
        result = run_training(cfg, config_path=config, progress=progress, executor=ex)
    df = result.held_out_table()
    table = Table(
        title="Held-out evaluation (origins from the cut on)",
        caption="QLIKE/MSE vs the proxy over all steps; MCS: in the pre-cut model confidence set; "
        "VaR99: held-out 99% VaR exceptions and Basel zone; ★ champion",
    )
    labels = {ds: ev.get("asset_label", ds) for ds, ev in result.evaluation["assets"].items()}
    for col in ("asset", "model", "QLIKE pre", "MCS", "QLIKE out", "MSE out", "n out", "VaR99", "zone", "★"):
        table.add_column(col, justify="left" if col in ("asset", "model", "zone") else "right", no_wrap=True)
    for r in df.to_dict("records"):
        table.add_row(
            str(labels.get(r["asset"], r["asset"])),
            str(r["model"]),
            _fmt(r["qlike_pre"]),
            _fmt(r["in_mcs_pre"]),
            _fmt(r["qlike_held_out"]),
            _fmt(r["mse_held_out"], 2),
            _fmt(r["n_held_out"]),
            _fmt(r["var99_breaches"]),
            _fmt(r["traffic_light"]),
            "★" if r["champion"] else "",
        )
    _table_console().print(table)
    for ds, ev in result.evaluation["assets"].items():
        for key, err in ev.get("failed", {}).items():
            console.print(f"[bold yellow]warning:[/] {ds} / {key} failed and is left out: {err}")
        d = ev.get("decision")
        if d:
            verdict = "promoted" if d["promoted"] else "kept"
            console.print(f"[bold]{ds}[/]: champion {d['champion_after']} ({verdict}); " + "; ".join(d["reasons"]))
    console.print(f"evaluation: {result.evaluation_path}")
    console.print(f"MLflow: {result.tracking_uri} (parent run {result.run_id})")


def _hpo_config_model() -> type:
    """``HpoSettings`` of the training stage plus where trials run (``executor``), as ``volmargin hpo`` reads it."""
    from pydantic import Field

    from training.hpo import HpoSettings
    from volmargin.config import ExecutorConfig

    class HpoConfig(HpoSettings):
        """Configuration of ``volmargin hpo`` (``configs/hpo.yaml``)."""

        executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    return HpoConfig


@user_errors
def hpo(
    config: Path = typer.Option(..., "--config", "-c", help="Search config (YAML), e.g. configs/hpo.yaml."),
    workers: int | None = typer.Option(None, "--workers", help="Override executor.workers and concurrent trials."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP + " Trials then run on Ray Tune."),
    trials: int | None = typer.Option(None, "--trials", help="Override n_trials."),
    promote: bool = typer.Option(True, "--promote/--no-promote",
                                 help="Put the best configuration through the training job and the promotion gate."),
) -> None:
    """Hyperparameter search on pre-cut walk-forward folds (Optuna locally, Ray Tune on Ray); each trial a nested
    MLflow run; the best configuration registered as challenger through the promotion gate."""
    from training.hpo import promote_best, run_search
    from training.job import load_features
    from training.tracking import resolve_tracking_uri
    from volmargin.config import load_config
    from volmargin.executor import make_executor

    cfg = load_config(config, kind=_hpo_config_model())
    update: dict[str, Any] = {"executor": executor_override(cfg.executor, workers, ray_address)}
    if workers is not None:
        update["concurrent"] = workers
    if trials is not None:
        if trials < max(1, len(cfg.points_to_evaluate)):
            raise ValueError(f"--trials must be >= max(1, number of points_to_evaluate), got {trials}")
        update["n_trials"] = trials
    cfg = cfg.model_copy(update=update)
    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    label, frame = load_features(cfg.dataset)
    engine = "tune" if cfg.executor.backend == "ray" else "optuna"
    with make_executor(cfg.executor.backend, cfg.executor.workers, cfg.executor.address) as ex, \
            stage_progress() as progress:
        ex.connect()
        result = run_search(cfg, frame, engine=engine, executor=ex, tracking_uri=uri, progress=progress)
        if promote:
            result = promote_best(cfg, result, frame, executor=ex, label=label, progress=progress)
    table = Table(title=f"Trials ({engine}): pre-cut QLIKE on walk-forward folds before {cfg.cut_date}")
    df = result.table()
    for col in df.columns:
        table.add_column(str(col), justify="left" if col in ("error",) else "right")
    for r in df.to_dict("records"):
        star = " ★" if r["trial"] == result.best.number else ""
        table.add_row(*[_fmt(v) + (star if k == "qlike_pre_cut" else "") for k, v in r.items()])
    _table_console().print(table)
    console.print(f"best: trial {result.best.number} {result.best_params} (pre-cut QLIKE {_fmt(result.best.score, 6)})")
    if result.promotion is not None:
        d = result.promotion.get("decision") or {}
        if result.promotion["registered"]:
            verdict = "promoted to champion" if d.get("promoted") else "registered as challenger"
        else:
            verdict = f"not registered: the gate's candidate is {d.get('candidate')}"
        console.print(f"[bold]{cfg.dataset}[/]: {result.promotion['searched_key']} {verdict}; "
                      + "; ".join(d.get("reasons", [])))
    console.print(f"MLflow: {uri} (search run {result.search_run_id})")


@models_app.command("list")
@user_errors
def list_models(
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db."),
) -> None:
    """Registered models, their aliases (champion, challenger) and key metrics."""
    from training.registry import list_registered
    from training.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    rows = list_registered(uri)
    table = Table(title=f"Registered models ({uri})")
    for col in ("model", "alias", "version", "spec", "cut", "QLIKE pre-cut", "QLIKE held-out", "champion at cut"):
        table.add_column(col)
    for rm in rows:
        if not rm["aliases"]:
            table.add_row(rm["name"], "–", "", "", "", "", "", "")
        for alias, a in rm["aliases"].items():
            table.add_row(
                rm["name"], alias, a["version"], str(a["model_key"]), str(a["cut"]),
                _fmt(_float(a["qlike_pre_cut"])), _fmt(_float(a["qlike_held_out"])), str(a["champion_at_cut"] or ""),
            )
    if not rows:
        console.print("no registered models yet; run `volmargin train --config configs/train_demo.yaml`")
        return
    _table_console().print(table)


def _float(s: object) -> float | None:
    try:
        return float(s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def register(app: typer.Typer) -> None:
    """Add ``train``, ``hpo`` and ``models`` to the main app."""
    app.command("train")(train)
    app.command("hpo")(hpo)
    app.add_typer(models_app, name="models")
