"""The stress job: configs/stress.yaml -> ``DIR/stress.json`` + ``DIR/stress_report.html``, logged to MLflow.

:func:`run_stress_job` validates the config (:func:`stress.suite.load_settings`), runs the suite
(:func:`stress.suite.run_suite`), writes the JSON and the standalone HTML report atomically, and logs one
MLflow run (params: the flattened config; metrics: every scenario × policy number; artifacts: config, JSON,
report). Only this process writes to MLflow. The report shows the cascade paths (mark price against the
exogenous price, insurance fund) per scenario, the per-scenario policy ranking with the pre-window average
collateral every policy was brought to (equal capital, :mod:`stress.budget`), the reverse-stress shock sizes and
the headline: which policy amplifies cascades least at equal capital, with numbers.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from data_pipelines.atomic import atomic_write_text
from stress.suite import MapFn, build_task, load_settings, run_suite
from training.tracking import resolve_tracking_uri, use_experiment
from volmargin.executor import Executor
from volmargin.report import finite_or_none

log = logging.getLogger(__name__)

__all__ = ["StressJobResult", "run_stress_job", "executor_map", "to_json", "render_stress_report"]

KEYS = ("cascade_depth", "liquidated_notional", "impact_from_liquidations", "bad_debt", "fund_min", "cover2_ok",
        "self_inflicted_share")


@dataclass(frozen=True)
class StressJobResult:
    json_path: Path
    report_path: Path
    run_id: str | None
    tracking_uri: str | None
    seconds: float
    summary: dict[str, Any]


def _clean(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items() if not isinstance(v, pd.DataFrame)}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return finite_or_none(x)
    return str(x)


def to_json(out: Mapping[str, Any]) -> dict[str, Any]:
    """``stress.json`` content: the suite's output without the per-bar series; NaN/inf become null."""
    return _clean(out)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _paths_plot(name: str, sc: Mapping[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = sc["policies"]
    frames = {p: m.get("series") for p, m in pols.items() if isinstance(m.get("series"), pd.DataFrame)}
    if not frames:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    first = next(iter(frames.values()))
    if "exog_close" in first:
        axes[0].plot(first.index, first["exog_close"], color="black", lw=1.2, label="without liquidations")
        for p, f in frames.items():
            axes[0].plot(f.index, f["mark_close"], lw=1, label=p)
        axes[0].set_title(f"{name}: price (USD)")
        for p, f in frames.items():
            axes[1].plot(f.index, f["fund"], lw=1, label=p)
        axes[1].set_title("insurance fund (USD)")
        for p, f in frames.items():
            axes[2].plot(f.index, f["im"], lw=1, label=p)
        axes[2].set_title("IM for new positions")
    else:  # contagion: BTC price and fund
        for p, f in frames.items():
            axes[0].plot(f.index, f["BTC"], lw=1, label=p)
            axes[1].plot(f.index, f["fund"], lw=1, label=p)
            axes[2].plot(f.index, f["debt"], lw=1, label=p)
        axes[0].set_title(f"{name}: BTC after impact (USD)")
        axes[1].set_title("perp insurance fund (USD)")
        axes[2].set_title("lending debt outstanding (USD)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[0].legend(fontsize=7)
    return _png(fig)


def _fmt(k: str, v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "<b>no</b>"
    f = finite_or_none(v)
    if f is None:
        return "n/a"
    if k in ("impact_from_liquidations", "self_inflicted_share"):
        return f"{100 * f:.1f}%"
    if k == "cascade_depth":
        return str(int(f))
    return f"{f:,.0f}"


def _shock(x: Any) -> str:
    return "not emptied" if x is None else f"{100 * float(x):.1f}%"


def _how(b: Mapping[str, Any] | None) -> str:
    """How a policy reached the budget: the static pair, the scale or the fit."""
    if not b:
        return ""
    pair = b.get("pair")
    parts = [str(b.get("method", ""))]
    if pair:
        parts.append(f"IM {100 * pair['im']:.2f}%" + (f", MM {100 * pair['mm']:.2f}%" if pair.get("mm") else ""))
    if b.get("scale") is not None:
        parts.append(f"scale {b['scale']:.3g}")
    return "; ".join(parts)


def _capital(sc: Mapping[str, Any]) -> str:
    b = sc.get("budget") or {}
    if b.get("target") is None:
        return ""
    cal = b.get("calibration") or {}
    where = f" (calibrated before {b['calibrated_on']}'s window)" if b.get("calibrated_on") else ""
    return (f"<p>Equal capital{html.escape(where)}: every policy locks {100 * b['target']:.1f}% average collateral "
            f"on the {cal.get('bars')} bars before the window ({html.escape(str(cal.get('start')))} to "
            f"{html.escape(str(cal.get('end')))}); spread {100 * b['spread']:.2f} points.</p>")


def _notes(out: Mapping[str, Any]) -> str:
    """What the self-inflicted share measures, and how the dynamic grid enters (when it is compared)."""
    text = ("Self-inflicted share: the share of the liquidated notional that the policy's own margin moves caused, "
            "position by position against the same run with its IM and MM frozen from the shock on at the values "
            "published before it (sum over positions of max(L_i - L_i frozen, 0) / L). The net (L - L frozen) / L, "
            "which nets the positions a raised MM liquidates against those a raised IM spares, is in "
            "stress.json (details.net_response_share).")
    grids = {p: (m.get("budget") or {}).get("grid") for sc in out.get("scenarios", {}).values()
             for p, m in sc.get("policies", {}).items() if (m.get("budget") or {}).get("grid")}
    if grids:
        text += (f" {', '.join(sorted(grids))}: the dynamic portfolio grid on the isolated-perp population, reduced to "
                 "the IM/MM rates its spot range r implies for one linear perp (IM = r, MM = mm_fraction x r: a lone "
                 "perp's grid margin; vol shocks, offsets across underlyings and the concentration add-on do not act "
                 "on it, so the reduction is faithful for directional perp books and says nothing about option or "
                 "multi-asset books, which the portfolio backtest covers); its raw range scaled to the budget.")
    return text


def render_stress_report(out: Mapping[str, Any], title: str = "Stress test") -> str:
    """Standalone HTML (plots as base64 PNG, no external resources)."""
    h = out.get("headline", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}.head{background:#eef6ee;padding:10px;border:1px solid #9c9}"
             "</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if h:
        parts.append(f"<p class='head'><b>Headline.</b> {html.escape(h.get('statement', ''))}. Ranking per scenario: "
                     "least liquidated notional first (ties: bad debt); the least amplifying policy has the best mean "
                     "rank.</p>")
        coll = (h.get("budget") or {}).get("mean_pre_window_avg_collateral") or {}

        def pct(x: Any) -> str:
            return "n/a" if x is None else f"{100 * x:.2f}%"

        rows = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{h['mean_rank'].get(p, float('nan')):.2f}</td>"
            f"<td>{h['wins'].get(p, 0)}</td><td>{h['total_liquidated_notional'][p]:,.0f}</td>"
            f"<td>{h['total_bad_debt'][p]:,.0f}</td><td>{100 * h['mean_self_inflicted_share'][p]:.1f}%</td>"
            f"<td>{_shock(h['reverse_stress_shock'].get(p))}</td><td>{pct(coll.get(p))}</td></tr>"
            for p in sorted(h["total_liquidated_notional"], key=lambda p: (h["mean_rank"].get(p, 0),
                                                                           h["total_liquidated_notional"][p])))
        parts.append("<table><tr><th>policy</th><th>mean rank</th><th>scenarios ranked first</th>"
                     "<th>liquidated notional (USD, all)</th><th>bad debt (USD, all)</th><th>mean self-inflicted share"
                     "</th><th>reverse stress: drop that empties the fund</th><th>pre-window avg collateral (mean)</th>"
                     f"</tr>{rows}</table>")
    parts.append(f"<p>{html.escape(_notes(out))}</p>")
    for name, sc in out.get("scenarios", {}).items():
        parts.append(f"<h2>{html.escape(name)} <small>({html.escape(str(sc.get('kind')))})</small></h2>")
        meta = {k: v for k, v in sc.get("meta", {}).items() if not isinstance(v, dict)}
        parts.append(f"<p>{html.escape(json.dumps(_clean(meta)))}</p>{_capital(sc)}")
        head = "".join(f"<th>{k}</th>" for k in KEYS) + "<th>pre-window avg collateral</th><th>at the budget by</th>"

        def cap_cells(m: Mapping[str, Any]) -> str:
            b = m.get("budget") or {}
            c = b.get("pre_window_avg_collateral")
            return (f"<td>{'n/a' if c is None else f'{100 * c:.2f}%'}</td>"
                    f"<td style='text-align:left'>{html.escape(_how(b))}</td>")

        body = "".join(
            f"<tr><td>{i + 1}. {html.escape(p)}</td>" + "".join(f"<td>{_fmt(k, sc['policies'][p][k])}</td>" for k in KEYS)
            + cap_cells(sc["policies"][p]) + "</tr>" for i, p in enumerate(sc.get("ranking", sc["policies"])))
        parts.append(f"<table><tr><th>policy (rank)</th>{head}</tr>{body}</table>")
        img = _paths_plot(name, sc)
        if img:
            parts.append(f"<img alt='cascade paths {html.escape(name)}' src='data:image/png;base64,{img}'>")
    rv = out.get("reverse_stress", {})
    if rv:
        parts.append("<h2>Reverse stress</h2><p>Smallest drop at the calm base's shock bar that empties the insurance"
                     " fund (bisection).</p><table><tr><th>policy</th><th>shock size</th><th>evaluations</th></tr>")
        for p, v in rv.items():
            parts.append(f"<tr><td>{html.escape(p)}</td><td>{_shock(v.get('shock_size'))}</td>"
                         f"<td>{v.get('evaluations')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def _metrics(js: Mapping[str, Any]) -> dict[str, float]:
    m: dict[str, float] = {}
    for sc, v in js.get("scenarios", {}).items():
        for p, r in v["policies"].items():
            for k in KEYS:
                x = r.get(k)
                x = float(x) if isinstance(x, int | float) else None
                if x is not None:
                    m[f"{sc}.{p}.{k}"[:250]] = x
            c = (r.get("budget") or {}).get("pre_window_avg_collateral")
            if isinstance(c, int | float):
                m[f"{sc}.{p}.pre_window_avg_collateral"[:250]] = float(c)
    for p, v in js.get("reverse_stress", {}).items():
        if v.get("shock_size") is not None:
            m[f"reverse.{p}.shock_size"] = float(v["shock_size"])
    return m


def executor_map(ex: Executor, progress: Callable[[str, int, int], None] | None = None) -> MapFn:
    """The suite's ``map_fn`` on an executor: results in task order, progress as tasks complete."""

    def map_fn(fn: Callable[[Any], Any], tasks: Any) -> list[Any]:
        label = "policies" if fn is build_task else "stress runs"
        out: list[Any] = [None] * len(tasks)
        for n, (i, r) in enumerate(ex.map_unordered(fn, tasks), start=1):
            out[i] = r
            if progress:
                progress(label, n, len(tasks))
        return out

    return map_fn


def run_stress_job(config: str | Path, out_dir: str | Path, *, progress: Callable[[str, int, int], None] | None = None,
                   tracking_uri: str | None = None, log_mlflow: bool = True,
                   executor: Executor | None = None) -> StressJobResult:
    """Run configs/stress.yaml, write ``stress.json`` and ``stress_report.html`` in ``out_dir``, log to MLflow.

    With ``executor`` the suite's tasks (policy builds, scenario × policy runs, contagion cases, reverse stress)
    run on it (local processes or Ray); the numbers are the same as in this process. Only this process writes
    to MLflow.
    """
    t0 = time.perf_counter()
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"stress config {str(config)!r} does not exist")
    raw = yaml.safe_load(config.read_text())
    settings = load_settings(raw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = run_suite(settings, progress=progress, map_fn=None if executor is None else executor_map(executor, progress))
    js = to_json({**res, "settings": {"config": str(config), "config_hash": hashlib.sha256(config.read_bytes()).hexdigest()}})
    jp = atomic_write_text(out / "stress.json", json.dumps(js, indent=2, sort_keys=False))
    rp = atomic_write_text(out / "stress_report.html", render_stress_report(res, f"Stress test: {settings.name}"))
    run_id = uri = None
    if log_mlflow:
        import mlflow

        tr = raw.get("tracking") or {}
        uri = resolve_tracking_uri(tracking_uri or tr.get("uri"))
        use_experiment(str(tr.get("experiment", settings.name)), uri)
        with mlflow.start_run(run_name=f"{settings.name}-stress", tags={"job": "stress"}) as run:
            run_id = run.info.run_id
            flat = pd.json_normalize({k: v for k, v in raw.items() if k != "policies"}, sep=".").iloc[0].to_dict()
            mlflow.log_params({k[:250]: str(v)[:500] for k, v in list(flat.items())[:400]})
            mlflow.log_param("policies", ",".join(s.name for s in settings.policies))
            if executor is not None:
                mlflow.log_param("executor", f"{executor.backend}:{executor.workers}")
            mlflow.log_metrics(_metrics(js))
            mlflow.set_tag("least_amplifying", str(js.get("headline", {}).get("least_amplifying")))
            for p in (config, jp, rp):
                mlflow.log_artifact(str(p))
    return StressJobResult(json_path=jp, report_path=rp, run_id=run_id, tracking_uri=uri,
                           seconds=time.perf_counter() - t0, summary=js)
