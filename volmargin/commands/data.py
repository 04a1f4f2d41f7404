"""``volmargin data ...``: list data sets, prepare one (parquet + quality.json), check a file's quality.

Bad input (unknown source, wrong columns, unparsable numbers, empty file, failed checksum, a failed
check under ``--policy fail``) exits with code 2 and one message naming the file, row and column;
outputs are written atomically, so a failure leaves no partial output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from volmargin.commands._common import console, user_errors

app = typer.Typer(no_args_is_help=True)

_POLICY_HELP = "What to do with problems: repair (default: fix what can be fixed, drop the rest), drop, fail."
_SHORT = {
    "timezone_offsets": "converted to UTC",
    "non_finite_values": "rows dropped",
    "non_positive_prices": "rows dropped",
    "negative_volume": "rows dropped",
    "unsorted": "sorted (lossless)",
    "off_grid_bars": "dropped, not snapped",
    "duplicate_timestamps": "kept last written",
    "ohlc_inconsistent": "high/low widened",
    "wick_outliers": "wick clipped",
    "gaps": "kept, flagged, not filled",
    "extreme_returns": "flagged, kept",
    "zero_volume_bars": "flagged, kept",
}
_SHORT_DROP = {"duplicate_timestamps": "conflicts dropped", "ohlc_inconsistent": "rows dropped",
               "wick_outliers": "rows dropped"}
_CHANGES = {"non_finite_values", "non_positive_prices", "negative_volume", "unsorted", "off_grid_bars",
            "duplicate_timestamps", "ohlc_inconsistent", "wick_outliers"}


def _policy(value: str) -> str:
    from data_pipelines.quality import POLICIES

    if value not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {value!r}")
    return value


def _calendar(value: str | None) -> str | None:
    if value is not None and value not in ("24/7", "business"):
        raise ValueError(f"--calendar must be '24/7' or 'business', got {value!r}")
    return value


def _day(iso: str | None) -> str:
    if not iso:
        return "-"
    return iso[:16].replace("T", " ") if not iso[11:19] == "00:00:00" else iso[:10]


def render_summary(report: Any, *, title: str | None = None, out_dir: Path | None = None,
                   target: Console | None = None) -> None:
    """Print a one-screen rich summary of a :class:`~data_pipelines.quality.QualityReport`."""
    target = target or console
    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    head = Text()
    head.append(f"{d['source']}", style="bold")
    head.append(f"  asset {d['asset']}  bar {d['bar']} ({d['calendar']})  policy {d['policy']}\n")
    head.append(f"rows in {d['rows_in']:,} -> out {d['rows_out']:,}   ")
    head.append(f"{_day(d['first_time'])} .. {_day(d['last_time'])} UTC\n")
    head.append(f"content sha256 {d['content_hash'][:16]}…")
    if out_dir is not None:
        head.append(f"   written to {out_dir}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, expand=False)
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("what was done", overflow="fold")
    for a in d["actions"]:
        count = a["count"]
        check = a["check"]
        if check == "gaps":
            g = d["gaps"]
            shown = f"{g['count']} ({g['missing_bars']} bars, longest {g['longest_bars']})"
        elif check == "timezone_offsets":
            shown = ", ".join(f"{k}: {v}" for k, v in d["timezone_offsets"].items())
        elif check == "duplicate_timestamps":
            shown = f"{count} ({d['duplicate_groups_differing']} differ)"
        else:
            shown = f"{count:,}"
        style = "yellow" if (count and check in _CHANGES) else ("cyan" if count else "dim")
        short = (_SHORT_DROP if d["policy"] == "drop" else {}).get(check) or _SHORT.get(check, a["action"])
        if check == "timezone_offsets" and not count:
            count = 1  # always say how times were read
            short = "naive, read as UTC" if "none" in d["timezone_offsets"] else "one offset: converted to UTC"
        table.add_row(Text(check, style=style), Text(shown, style=style), Text(short if count else "-", style="dim" if not count else ""))
    foot = Text("rules: quality.json 'actions'; gaps are never forward-filled", style="dim")
    target.print(Panel(Group(head, table, foot), title=title or "data quality", expand=False))


@app.command("list")
@user_errors
def list_cmd(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Folder of prepared sets (default $VOLMARGIN_DATA_DIR or artifacts/data)."),
) -> None:
    """List the bundled data sets (and whether installed) and the cached prepared sets."""
    from data_pipelines.pipeline import list_datasets

    table = Table(title="volmargin data sets")
    table.add_column("id", no_wrap=True)
    for col in ("asset", "bar", "kind", "available"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    from data_pipelines.sources import BUNDLED

    hints: dict[str, str] = {}
    for info in list_datasets(cache_dir):
        avail = Text("yes", style="green") if info.available else Text("no", style="red")
        table.add_row(info.source_id, info.asset, info.bar, info.kind, avail, info.description)
        if not info.available and info.source_id in BUNDLED:
            try:
                BUNDLED[info.source_id].locate()
            except FileNotFoundError as exc:
                hints.setdefault(BUNDLED[info.source_id].package, str(exc))
    console.print(table)
    for hint in hints.values():
        console.print(Text(f"missing: {hint}", style="red"))


@app.command("prepare")
@user_errors
def prepare_cmd(
    source: str = typer.Option(..., "--source", "-s", help="Data-set id (bundled:bitstamp/BTC, csv:PATH, ...) or a file path."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: bars.parquet, features.parquet, quality.json."),
    policy: str = typer.Option("repair", "--policy", "-p", help=_POLICY_HELP),
    extreme_sigma: float = typer.Option(8.0, "--extreme-sigma", help="Flag returns beyond this many trailing robust sigmas."),
    bar: str | None = typer.Option(None, "--bar", help="Bar size override (pandas alias: 1D, 15min, 1h)."),
    calendar: str | None = typer.Option(None, "--calendar", help="24/7 (crypto, default for files) or business (equities)."),
) -> None:
    """Load, check and clean a data set, build features, and write them atomically to OUT."""
    from data_pipelines.pipeline import prepare_dataset, write_prepared

    prepared = prepare_dataset(source, policy=_policy(policy), extreme_sigma=extreme_sigma, bar=bar,  # type: ignore[arg-type]
                               calendar=_calendar(calendar))
    path = write_prepared(prepared, out)
    render_summary(prepared.report, title=f"{prepared.asset}: {source}", out_dir=path)


@app.command("quality")
@user_errors
def quality_cmd(
    file: str = typer.Argument(..., help="A data file (.csv, .parquet, Binance .zip, CCXT .json) or a data-set id."),
    policy: str = typer.Option("repair", "--policy", "-p", help=_POLICY_HELP),
    bar: str | None = typer.Option(None, "--bar", help="Bar size (pandas alias); inferred when omitted."),
    asset: str | None = typer.Option(None, "--asset", help="Asset label (default: the file name)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the report as JSON here (atomically)."),
    extreme_sigma: float = typer.Option(8.0, "--extreme-sigma", help="Flag returns beyond this many trailing robust sigmas."),
    calendar: str | None = typer.Option(None, "--calendar", help="24/7 (crypto, default for files) or business (equities)."),
) -> None:
    """Run the quality checks on FILE and print the report (nothing is written unless --out)."""
    from data_pipelines.quality import check_and_clean, write_quality_json
    from data_pipelines.sources import load_raw

    cal = _calendar(calendar)
    raw = load_raw(file, asset=asset, bar=bar, calendar=cal)  # type: ignore[arg-type]
    _, report = check_and_clean(raw, policy=_policy(policy), bar=bar, extreme_sigma=extreme_sigma,  # type: ignore[arg-type]
                                calendar=cal)  # type: ignore[arg-type]
    if out is not None:
        write_quality_json(report, out)
    render_summary(report, title=f"quality: {file}", out_dir=out)
