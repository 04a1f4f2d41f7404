"""``volmargin margin``: margin, health factor and liquidation price of a portfolio (table or JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from volmargin.commands._common import console, user_errors

__all__ = ["register", "margin"]


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.{digits}f}"


@user_errors
def margin(
    portfolio: Path = typer.Option(..., "--portfolio", help="Portfolio JSON (schemas/portfolio.schema.json)."),
    params: Path | None = typer.Option(None, "--params", help="Params file JSON (schemas/params_file.schema.json)."),
    params_from: Path | None = typer.Option(
        None, "--params-from",
        help="Run directory with portfolio_grid.json (the dynamic_grid path of a run): use its grid at --as-of."),
    as_of: str | None = typer.Option(
        None, "--as-of", help="UTC time selecting the grid of --params-from (default: the portfolio's as_of)."),
    mode: str = typer.Option("cross", "--mode", help="isolated | cross | portfolio"),
    scenarios: str = typer.Option("auto", "--scenarios", help="portfolio mode: auto | grid | fhs"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print margin (IM/MM), health factor and liquidation price per account."""
    from margin.engine import compute_margin
    from margin.validation import load_params_file, load_portfolio

    if mode not in ("isolated", "cross", "portfolio"):
        raise ValueError(f"--mode must be isolated, cross or portfolio, got {mode!r}")
    if (params is None) == (params_from is None):
        raise ValueError("give exactly one of --params FILE or --params-from RUN_DIR")
    pf = load_portfolio(portfolio)
    if params_from is not None:
        from margin.dynamic_grid import GridPath

        grid_file = params_from / "portfolio_grid.json" if params_from.is_dir() else params_from
        if not grid_file.exists():
            raise ValueError(f"--params-from: no portfolio_grid.json in {params_from}")
        gp = GridPath.read(grid_file)
        when = as_of if as_of is not None else pf.as_of
        prm = gp.params_at_time(when)  # cross mode: the grid's range as flat IM rate, MM = mm_fraction × it
    else:
        if as_of is not None:
            raise ValueError("--as-of only applies with --params-from")
        prm = load_params_file(params)
    res = compute_margin(pf, prm, mode, scenarios=scenarios)  # type: ignore[arg-type]
    doc = res.to_dict()
    if as_json:
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    title = f"{mode} margin" + (f" ({res.scenarios} scenarios)" if res.scenarios else "") + f" at {pf.as_of.isoformat()}"
    t = Table(title=title)
    for col in ("account", "IM", "MM", "collateral", "uPnL", "equity", "health", "liq. price"):
        t.add_column(col, justify="left" if col == "account" else "right")
    for a in doc["accounts"]:
        hf = a["health_factor"]
        style = "red" if hf is not None and hf <= 1 else ("yellow" if hf is not None and hf < 1.5 else "")
        lp = _fmt(a["liquidation_price"])
        if a["liquidation_underlying"] and a["liquidation_price"] is not None:
            lp = f"{a['liquidation_underlying']} {lp}"
        t.add_row(
            a["account"], _fmt(a["initial_margin"]), _fmt(a["maintenance_margin"]), _fmt(a["collateral_value"]),
            _fmt(a["unrealised_pnl"]), _fmt(a["equity"]), _fmt(hf, 3), lp, style=style,
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add ``volmargin margin`` to the main app."""
    app.command("margin", help="Margin, health factor and liquidation price of a portfolio.")(margin)
