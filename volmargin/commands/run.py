"""``volmargin run --config FILE --out DIR`` and ``volmargin backtest --config FILE --out DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from volmargin.commands._common import console, stage_progress, user_errors


def _pct(x: object) -> str:
    return "–" if x is None else f"{100 * float(x):+.1f}%"  # type: ignore[arg-type]


def _execute(config: Path, out: Path, mode: str) -> None:
    from volmargin.config import load_config
    from volmargin.run import run_job

    cfg = load_config(config, "run")
    with stage_progress() as progress:
        result = run_job(cfg, out, mode=mode, config_path=config, progress=progress)
    s = result.summary
    table = Table(title="Held-out headline: change against the static frontier at equal collateral (negative is fewer)")
    for col in ("asset", "policy", "liquidations", "bad debt", "avg collateral", "liq. change", "bad-debt change",
                "share of bound (liq.)", "share of bound (bad debt)", "5d IM increase", "zone"):
        table.add_column(col, justify="left" if col in ("asset", "policy", "zone") else "right", no_wrap=True)
    for asset, a in s["assets"].items():
        for pol in ("ewma_ccp", "garch_fhs", "predictive", "oracle_vol", "bound_liquidations", "bound_bad_debt"):
            c = dict(a["comparison"].get(f"{pol}_vs_best_static", {}))
            if pol.startswith("bound_"):
                # the bound is run once per objective: each row shows the change of its own objective
                whole = a["comparison"].get("bound_vs_best_static", {})
                mine = pol.removeprefix("bound_")
                c = {f"{mine}_change": whole.get(f"{mine}_change"), f"share_of_bound_{mine}": 1.0}
            p = a["policies"].get(pol, {})
            if not p:
                continue
            share_l, share_b = c.get("share_of_bound_liquidations"), c.get("share_of_bound_bad_debt")
            table.add_row(
                asset, pol, str(p.get("liquidations", "–")), f"{p.get('bad_debt', float('nan')):,.0f}",
                f"{100 * p.get('avg_collateral', float('nan')):.2f}%", _pct(c.get("liquidations_change")),
                _pct(c.get("bad_debt_change")), "–" if share_l is None else f"{share_l:.2f}",
                "–" if share_b is None else f"{share_b:.2f}", f"{100 * p.get('max_im_increase_5d', float('nan')):.0f}%",
                str(p.get("traffic_light") or "–"),
            )
    (console if console.is_terminal else Console(width=160)).print(table)
    for key, v in s["comparison"].items():
        console.print(
            f"[bold]{key}[/] (pooled over {v['n_assets']} assets): liquidations {_pct(v['liquidations_change'])}, "
            f"bad debt {_pct(v['bad_debt_change'])}"
        )
    from volmargin.report import verdict, verdict_tally

    rows = verdict(s)
    met, n_pass, n_fail, n_na = verdict_tally(rows)
    console.print(f"[bold]target {'met' if met else 'NOT met'}[/] (as in the report): "
                  f"{n_pass} checks pass, {n_fail} fail, {n_na} undefined")
    for r in rows:
        if r["passed"] is False:
            console.print(f"  {r['scope']}: {r['check']}: {r['detail']}", soft_wrap=True)
    console.print(f"report: {result.report_path}")
    console.print(f"summary: {result.summary_path}")
    console.print(f"MLflow: {result.tracking_uri} (run {result.run_id}); {result.seconds:.0f}s")


@user_errors
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML), e.g. configs/demo.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (summary.json, report.html, details.json)."),
) -> None:
    """End to end: bundled data → forecasts → optimization → held-out backtests → report and summary."""
    _execute(config, out, "run")


@user_errors
def backtest(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (summary.json, report.html, details.json)."),
) -> None:
    """The backtest alone, from saved forecast tables (forecasts_dir) or the pinned champions' tables."""
    _execute(config, out, "backtest")


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``backtest`` to the main app."""
    app.command("run")(run)
    app.command("backtest")(backtest)
