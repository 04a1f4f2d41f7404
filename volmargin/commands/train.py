"""``volmargin train --config FILE`` and ``volmargin models list``."""

from __future__ import annotations

import math
from pathlib import Path

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


@user_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="Training config (YAML), e.g. configs/train_btc.yaml."),
    workers: int | None = typer.Option(None, "--workers", help="Override executor.workers."),
) -> None:
    """Walk-forward training and evaluation; logs to MLflow and writes artifacts/train/<run id>/evaluation.json."""
    from training.job import run_training
    from volmargin.config import load_config
    from volmargin.executor import make_executor

    cfg = load_config(config)
    if workers is not None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        cfg = cfg.model_copy(update={"executor": cfg.executor.model_copy(update={"workers": workers})})
    with stage_progress() as progress:
        result = run_training(
            cfg,
            config_path=config,
            progress=progress,
            executor=make_executor(cfg.executor.backend, cfg.executor.workers, cfg.executor.address),
        )
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
    """Add ``train`` and ``models`` to the main app."""
    app.command("train")(train)
    app.add_typer(models_app, name="models")
