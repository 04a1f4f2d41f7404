"""``volmargin run --config FILE --out DIR`` and ``volmargin backtest --config FILE --out DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from volmargin.commands._common import console, stage_progress, user_errors
from volmargin.commands.train import RAY_ADDRESS_HELP


def _execute(config: Path, out: Path, mode: str, ray_address: str | None = None) -> None:
    from volmargin.commands.train import executor_override
    from volmargin.config import load_config
    from volmargin.run import run_job

    cfg = load_config(config, "run")
    if ray_address is not None:  # the same job on a Ray cluster: training tasks and the per-asset backtests
        ex = executor_override(cfg.training.executor, None, ray_address)
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"executor": ex})})
    with stage_progress() as progress:
        result = run_job(cfg, out, mode=mode, config_path=config, progress=progress)
    s = result.summary
    table = Table(title="Held-out headline at each capital budget (frozen setting): liquidations / bad debt (USD) "
                        "at each policy's own collateral; share = (static - policy) / (static - bound)")
    for col in ("asset", "budget", "best static pair", "static", "bound", "predictive", "share", "ewma_ccp",
                "garch_fhs", "verdict"):
        table.add_column(col, justify="left" if col in ("asset", "best static pair", "verdict") else "right",
                         no_wrap=True)

    def cell(v: dict | None) -> str:
        if not v:
            return "–"
        return f"{v.get('liquidations')} / {float(v.get('bad_debt') or 0):,.0f} @ {100 * float(v.get('avg_collateral') or 0):.1f}%"

    for asset, a in s["assets"].items():
        for b, e in a["budgets"].items():
            st = e.get("best_static") or {}
            pred = e.get("predictive") or {}
            share = pred.get("share_of_bound")
            bound = (e.get("bound") or {}).get("liquidations")
            table.add_row(
                asset, f"{100 * float(b):g}%",
                f"IM {100 * st['im']:.1f}% MM {100 * st['mm']:.1f}%" if st else "none",
                cell(st), "–" if bound is None else f"{bound:,.0f}", cell(pred),
                "–" if share is None else f"{share:.2f}", cell(e.get("ewma_ccp")), cell(e.get("garch_fhs")),
                "met" if (e.get("checks") or {}).get("met") else "not met",
            )
    (console if console.is_terminal else Console(width=200)).print(table)
    h = s["headline"]
    console.print(f"[bold]headline[/]: share of the bound min {h['share_of_bound_min']}, mean "
                  f"{h['share_of_bound_mean']} ({h['shares_undefined']} undefined); budgets met "
                  f"{h['budgets_met']} of {h['budgets_total']}")
    from volmargin.report import verdict, verdict_tally

    rows = verdict(s)
    met, n_pass, n_fail, n_na = verdict_tally(rows)
    console.print(f"[bold]target {'met' if met else 'NOT met'}[/] (as in the report): "
                  f"{n_pass} checks pass, {n_fail} fail, {n_na} undefined")
    for r in rows:
        if r["passed"] is False:
            console.print(f"  {r['scope']}: {r['check']}: {r['detail']}", soft_wrap=True)
    pf = s.get("portfolio") or {}
    if "skipped" in pf:
        console.print(f"[bold]portfolio[/]: skipped ({pf['skipped']})", soft_wrap=True)
    elif pf:
        from volmargin.report import portfolio_verdict

        console.print(f"[bold]portfolio[/] (dynamic_grid on multi-instrument accounts): target met at "
                      f"{h.get('portfolio_budgets_met')} of {h.get('portfolio_budgets_total')} budgets")
        for b, e in pf.items():
            console.print(f"  {100 * float(b):g}%: {portfolio_verdict(e)[1]}", soft_wrap=True)
    console.print(f"report: {result.report_path}")
    console.print(f"summary: {result.summary_path}")
    console.print(f"MLflow: {result.tracking_uri} (run {result.run_id}); {result.seconds:.0f}s")


@user_errors
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML), e.g. configs/demo.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (summary.json, report.html, details.json)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """End to end: bundled data → forecasts → optimization → held-out backtests → report and summary."""
    _execute(config, out, "run", ray_address)


@user_errors
def backtest(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (summary.json, report.html, details.json)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """The backtest alone, from saved forecast tables (forecasts_dir) or the pinned champions' tables."""
    _execute(config, out, "backtest", ray_address)


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``backtest`` to the main app."""
    app.command("run")(run)
    app.command("backtest")(backtest)
