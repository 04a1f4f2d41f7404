"""``volmargin stress --config configs/stress.yaml --out DIR``: cascades, contagion and reverse stress per policy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from volmargin.commands._common import console, stage_progress, user_errors
from volmargin.commands.train import RAY_ADDRESS_HELP


@user_errors
def stress(
    config: Path = typer.Option(..., "--config", "-c", help="Stress config (YAML), e.g. configs/stress.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (stress.json, stress_report.html)."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to MLflow."),
    workers: int = typer.Option(1, "--workers", help="Local worker processes for the scenario × policy tasks "
                                "(1: in this process); with --ray-address, the cap on tasks in flight."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Stress every margin policy: liquidation cascades, contagion across venues, reverse stress."""
    from volmargin.executor import make_executor
    from volmargin.stress_job import KEYS, run_stress_job

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if ray_address is not None and not ray_address.strip():
        raise ValueError("--ray-address must not be empty (e.g. auto, ray://head:10001 or local)")
    backend, address = ("ray", ray_address.strip()) if ray_address is not None else ("local", None)
    with make_executor(backend, workers, address) as ex, stage_progress() as progress:
        res = run_stress_job(config, out, progress=progress, log_mlflow=not no_mlflow, executor=ex)
    s = res.summary
    table = Table(title="Stress at equal capital: per scenario, policies ranked by liquidated notional (least "
                        "amplifying first); pre_coll = pre-window avg collateral")
    for col in ("scenario", "policy", *KEYS, "pre_coll"):
        table.add_column(col, justify="left" if col in ("scenario", "policy") else "right", no_wrap=True)
    for name, sc in s["scenarios"].items():
        for p in sc["ranking"]:
            m = sc["policies"][p]
            c = (m.get("budget") or {}).get("pre_window_avg_collateral")
            table.add_row(name, p, *(str(m[k]) if isinstance(m[k], bool | int) or m[k] is None else f"{m[k]:,.3g}"
                                     for k in KEYS), "" if c is None else f"{100 * c:.2f}%")
    console.print(table)
    console.print(f"[bold]{s.get('headline', {}).get('statement', '')}[/]", soft_wrap=True)
    console.print(f"stress.json: {res.json_path}\nreport: {res.report_path}")
    if res.run_id:
        console.print(f"MLflow: {res.tracking_uri} (run {res.run_id}); {res.seconds:.0f}s")


def register(app: typer.Typer) -> None:
    """Add ``stress`` to the CLI."""
    app.command("stress")(stress)
