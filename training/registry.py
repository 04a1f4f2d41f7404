"""Model registry: one registered model per dataset, aliases ``champion`` / ``challenger``, promotion gate.

MLflow 3 has no stages; the registry uses aliases. The gate reads only the **pre-cut** section of the
evaluation (held-out folds never influence a choice):

* no champion yet → the model with the lowest pre-cut QLIKE inside the pre-cut MCS becomes champion
  (members with a pre-cut 99% VaR traffic light worse than ``max_traffic_light`` are skipped while
  another member passes: the champion passes the risk check a challenger must pass);
* otherwise the best candidate (same rule) becomes ``challenger`` and replaces the champion only if it has
  a lower pre-cut QLIKE, a one-sided Diebold-Mariano p-value below ``dm_alpha`` against the champion, MCS
  membership, and a pre-cut 99% VaR traffic light no worse than ``max_traffic_light``.

The decision and its reasons are logged (tags on the model version and a JSON artifact). The version that
is champion after training at a cut is tagged ``champion_at_cut=<date>`` and recorded in
``<artifacts>/registry/<registered name>.json`` so a backtest can pin it with :func:`pinned_champion`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from training.tracking import atomic_write_text

__all__ = [
    "DATASET_MODEL_NAMES",
    "registered_name",
    "Decision",
    "decide",
    "register_and_promote",
    "PinnedChampion",
    "pinned_champion",
    "list_registered",
]

log = logging.getLogger(__name__)

#: Registered model name per dataset id.
DATASET_MODEL_NAMES: dict[str, str] = {
    "bundled:bitstamp/BTC": "vol-BTC",
    "bundled:coinbase-pro/ETH": "vol-ETH",
    "bundled:coinbase-pro/LTC": "vol-LTC",
    "bundled:tsd/BTC-15m": "vol-BTC-15m",
    "bundled:tsd/BTC-1d": "vol-BTC-1d",
}

_ZONES = {"green": 0, "yellow": 1, "red": 2}


def registered_name(dataset: str) -> str:
    """Registered model name of a dataset: ``vol-BTC`` ...; other ids ``vol-<asset label>`` (a file's stem)."""
    if dataset in DATASET_MODEL_NAMES:
        return DATASET_MODEL_NAMES[dataset]
    try:
        from data_pipelines.pipeline import asset_label

        tail = asset_label(dataset)
    except (ImportError, ValueError):
        tail = dataset.split(":", 1)[-1].replace("/", "-")
    return "vol-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in tail)


@dataclass(frozen=True)
class Decision:
    """Outcome of the promotion gate for one dataset."""

    dataset: str
    cut: str
    candidate: str | None
    champion_before: str | None
    promoted: bool
    champion_after: str | None
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pre(evaluation: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return evaluation["models"][key].get("pre_cut", {})


def _zone(evaluation: Mapping[str, Any], key: str) -> str | None:
    return _pre(evaluation, key).get("var", {}).get("0.99", {}).get("traffic_light")


def best_candidate(evaluation: Mapping[str, Any], max_traffic_light: str | None = None) -> str | None:
    """Model with the lowest pre-cut QLIKE among the pre-cut MCS members (all models if no MCS).

    With ``max_traffic_light``, members whose pre-cut 99% VaR zone is worse are skipped (when at least
    one member passes), so a champion passes the same risk check a challenger must pass.
    """
    models = evaluation["models"]
    scored = {k: _pre(evaluation, k).get("qlike") for k in models}
    scored = {k: v for k, v in scored.items() if v is not None}
    if not scored:
        return None
    in_mcs = {k: v for k, v in scored.items() if _pre(evaluation, k).get("in_mcs", True)}
    pool = in_mcs or scored
    if max_traffic_light is not None:
        limit = _ZONES[max_traffic_light]
        passing = {k: v for k, v in pool.items() if _ZONES.get(_zone(evaluation, k) or "red", 2) <= limit}
        pool = passing or pool
    return min(pool, key=lambda k: (pool[k], k))


def decide(
    dataset: str,
    evaluation: Mapping[str, Any],
    champion_key: str | None,
    *,
    dm_alpha: float = 0.05,
    max_traffic_light: str = "yellow",
    selection: Mapping[str, Mapping[str, Any]] | None = None,
) -> Decision:
    """Apply the promotion gate to one asset's evaluation (pre-cut numbers only).

    Parameters
    ----------
    dataset : str
        Dataset id.
    evaluation : mapping
        One asset's output of :func:`training.evaluation.evaluate_asset`.
    champion_key : str, optional
        Model key of the current champion if it was evaluated in this job, else None. When there is a
        champion that this job did not evaluate, pass ``"<unevaluated>"``: it is kept.
    dm_alpha : float
        Significance of the one-sided Diebold-Mariano test of candidate over champion.
    max_traffic_light : {"green", "yellow"}
        Worst acceptable pre-cut 99% VaR zone.
    selection : mapping, optional
        Per model key, the test of a configuration chosen as the best of a search (``training.hpo``'s
        :func:`~training.hpo.selection_test`: Hansen's SPA p-value of all its trials against the champion,
        ``pvalue``, and ``trials``). Such a candidate must also have that p-value below ``dm_alpha`` to replace
        the champion: its own DM p-value ignores that it was the best of many.
    """
    cut = str(evaluation.get("cut"))
    cand = best_candidate(evaluation, max_traffic_light)
    if cand is None:
        return Decision(dataset, cut, None, champion_key, False, champion_key, ["no model has a pre-cut QLIKE"])
    pre = _pre(evaluation, cand)
    zone = pre.get("var", {}).get("0.99", {}).get("traffic_light")
    checks: dict[str, Any] = {
        "candidate_qlike_pre": pre.get("qlike"),
        "candidate_in_mcs": pre.get("in_mcs"),
        "candidate_traffic_light": zone,
    }
    if champion_key is None:
        if _ZONES.get(zone or "red", 2) <= _ZONES[max_traffic_light]:
            reasons = [
                f"no champion yet: {cand} has the lowest pre-cut QLIKE ({pre.get('qlike'):.6g}) inside the MCS "
                f"among models whose pre-cut 99% VaR traffic light is at most {max_traffic_light} (this one: {zone})"
            ]
        else:
            reasons = [
                f"no champion yet: {cand} has the lowest pre-cut QLIKE ({pre.get('qlike'):.6g}) inside the MCS; "
                f"WARNING: no MCS member has a pre-cut 99% VaR traffic light of {max_traffic_light} or better "
                f"(this one: {zone})"
            ]
        skipped = [k for k in evaluation["models"] if k != cand and _pre(evaluation, k).get("in_mcs")
                   and (_pre(evaluation, k).get("qlike") or np.inf) < (pre.get("qlike") or np.inf)]
        if skipped:
            reasons.append(f"skipped for their traffic light: {', '.join(sorted(skipped))}")
        return Decision(dataset, cut, cand, None, True, cand, reasons, checks)
    if champion_key == cand:
        reasons = [f"{cand} is the champion's specification and still the best pre-cut candidate; re-confirmed"]
        return Decision(dataset, cut, cand, champion_key, True, cand, reasons, checks)
    if champion_key not in evaluation["models"]:
        reasons = [f"champion {champion_key} was not evaluated in this job; kept, {cand} recorded as challenger"]
        return Decision(dataset, cut, cand, champion_key, False, champion_key, reasons, checks)
    champ = _pre(evaluation, champion_key)
    dm = pre.get("dm", {}).get(champion_key, {})
    p_better = dm.get("pvalue_better")
    checks.update({"champion_qlike_pre": champ.get("qlike"), "dm_pvalue_better": p_better})
    reasons = []
    ok = True
    if not (pre.get("qlike") is not None and champ.get("qlike") is not None and pre["qlike"] < champ["qlike"]):
        ok = False
        reasons.append(f"pre-cut QLIKE {pre.get('qlike')} is not below the champion's {champ.get('qlike')}")
    if p_better is None or not p_better < dm_alpha:
        ok = False
        reasons.append(f"Diebold-Mariano p-value {p_better} against the champion is not below {dm_alpha}")
    sel = (selection or {}).get(cand)
    if sel is not None:
        checks["selection"] = dict(sel)
        p_sel = sel.get("pvalue")
        if p_sel is None or not p_sel < dm_alpha:
            ok = False
            reasons.append(f"chosen as the best of {sel.get('trials')} search trials: SPA p-value {p_sel} of the "
                           f"search against the champion is not below {dm_alpha} (the DM p-value ignores the search)"
                           + (f"; {sel['error']}" if sel.get("error") else ""))
    if not pre.get("in_mcs", False):
        ok = False
        reasons.append("not a member of the pre-cut model confidence set")
    if zone is None or _ZONES.get(zone, 2) > _ZONES[max_traffic_light]:
        ok = False
        reasons.append(f"pre-cut 99% VaR traffic light is {zone} (worst accepted: {max_traffic_light})")
    if ok:
        reasons.append(
            f"{cand} beats champion {champion_key}: lower pre-cut QLIKE, DM p={p_better:.3g} < {dm_alpha}, "
            + (f"SPA p={sel['pvalue']:.3g} over {sel.get('trials')} search trials, " if sel is not None else "")
            + f"in MCS, traffic light {zone}"
        )
    return Decision(dataset, cut, cand, champion_key, ok, cand if ok else champion_key, reasons, checks)


# ---------------------------------------------------------------------------- MLflow side
def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _alias_version(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_and_promote(
    dataset: str,
    evaluation: Mapping[str, Any],
    logged: Mapping[str, Any],
    *,
    tracking_uri: str,
    artifacts_dir: str | Path,
    parent_run_id: str,
    schedule: Mapping[str, Any],
    dm_alpha: float = 0.05,
    max_traffic_light: str = "yellow",
    selection: Mapping[str, Mapping[str, Any]] | None = None,
) -> Decision:
    """Register the best candidate as a new version of the dataset's model and apply the gate.

    Parameters
    ----------
    dataset : str
        Dataset id.
    evaluation : mapping
        The asset's evaluation (:func:`training.evaluation.evaluate_asset`).
    logged : mapping
        ``TrainingTracker.log_asset`` output: per model key ``run_id``, ``forecast_table``,
        ``forecast_artifact`` and ``model_uri`` (None when no pyfunc model was logged).
    tracking_uri, artifacts_dir, parent_run_id
        Where to register and record.
    schedule : mapping
        Walk-forward schedule (refit every, window ...) recorded with the version.
    selection : mapping, optional
        Per model key, the selection test of a configuration found by a search (see :func:`decide`).
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    name = registered_name(dataset)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"Volatility forecaster champion for {dataset}")
    champ_v = _alias_version(client, name, "champion")
    champion_key = None
    if champ_v is not None:
        tag_key = champ_v.tags.get("model_key")
        tag_hash = champ_v.tags.get("spec_hash")
        models = evaluation["models"]
        if tag_key in models and models[tag_key]["spec"].get("version") == tag_hash:
            champion_key = tag_key
        else:
            champion_key = f"<unevaluated:{tag_key}>"
    decision = decide(dataset, evaluation, champion_key, dm_alpha=dm_alpha, max_traffic_light=max_traffic_light,
                      selection=selection)
    if champion_key is not None and champion_key.startswith("<unevaluated"):
        decision = Decision(
            decision.dataset, decision.cut, decision.candidate, champ_v.tags.get("model_key"), False,
            champ_v.tags.get("model_key"), decision.reasons, decision.checks,
        )
    if decision.candidate is None:
        return decision
    cand = decision.candidate
    info = logged["models"][cand]
    spec = evaluation["models"][cand]["spec"]
    source = info.get("model_uri") or info["forecast_artifact"]
    mv = client.create_model_version(name, source=source, run_id=info["run_id"], tags={
        "dataset": dataset,
        "model_key": cand,
        "model": spec["name"],
        "spec": json.dumps(spec, sort_keys=True, default=str),
        "spec_hash": spec["version"],
        "schedule": json.dumps(dict(schedule), sort_keys=True, default=str),
        "cut": decision.cut,
        "qlike_pre_cut": str(evaluation["models"][cand]["pre_cut"].get("qlike")),
        "qlike_held_out": str(evaluation["models"][cand]["held_out"].get("qlike")),
        "forecast_table": info["forecast_table"],
        "forecast_artifact": info["forecast_artifact"],
        "parent_run_id": parent_run_id,
        "has_pyfunc": str(info.get("model_uri") is not None).lower(),
    })
    version = str(mv.version)
    client.set_model_version_tag(name, version, "decision", "promoted" if decision.promoted else "challenger")
    client.set_model_version_tag(name, version, "decision_reasons", " | ".join(decision.reasons)[:5000])
    if decision.promoted:
        client.set_registered_model_alias(name, "champion", version)
        champion_version = version
        try:
            client.delete_registered_model_alias(name, "challenger")
        except MlflowException:
            pass
    else:
        client.set_registered_model_alias(name, "challenger", version)
        champion_version = str(champ_v.version) if champ_v is not None else None
    record: dict[str, Any] = {
        "dataset": dataset,
        "registered_model": name,
        "cut": decision.cut,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parent_run_id": parent_run_id,
        "candidate_version": version,
        "decision": decision.to_dict(),
    }
    if champion_version is not None:
        client.set_model_version_tag(name, champion_version, "champion_at_cut", decision.cut)
        cv = client.get_model_version(name, champion_version)
        record["champion"] = {
            "version": champion_version,
            "spec": json.loads(cv.tags.get("spec", "{}")),
            "schedule": json.loads(cv.tags.get("schedule", "{}")),
            "forecast_table": cv.tags.get("forecast_table"),
            "forecast_artifact": cv.tags.get("forecast_artifact"),
            "model_uri": cv.source,
        }
    _append_registry_record(Path(artifacts_dir), name, record)
    return decision


def _registry_path(artifacts_dir: Path, name: str) -> Path:
    return artifacts_dir / "registry" / f"{name}.json"


def _append_registry_record(artifacts_dir: Path, name: str, record: Mapping[str, Any]) -> Path:
    path = _registry_path(artifacts_dir, name)
    data: dict[str, Any] = {"registered_model": name, "history": []}
    if path.exists():
        data = json.loads(path.read_text())
    data["history"].append(dict(record))
    if "champion" in record:
        data.setdefault("champion_at_cut", {})[record["cut"]] = record["champion"]
    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


class PinnedChampion(NamedTuple):
    """The champion recorded at a cut: registry version, specification and forecast table location."""

    model_version: str
    spec: dict[str, Any]
    forecast_table: str
    forecast_artifact: str = ""  # ``runs:/<run id>/forecast/<file>``: the same table in MLflow's artifact store


def pinned_champion(
    dataset: str, cut: dt.date | str, *, artifacts_dir: str | Path = "artifacts", tracking_uri: str | None = None
) -> PinnedChampion:
    """Model version that was champion for ``dataset`` at ``cut`` (from the registry record).

    Reads ``<artifacts_dir>/registry/<name>.json``; with ``tracking_uri`` and no local record, searches the
    MLflow registry for the version tagged ``champion_at_cut=<cut>``.

    Raises
    ------
    KeyError
        No champion was recorded for that dataset and cut.
    """
    name = registered_name(dataset)
    cut_s = str(dt.date.fromisoformat(str(cut)[:10]))
    path = _registry_path(Path(artifacts_dir), name)
    if path.exists():
        data = json.loads(path.read_text())
        rec = data.get("champion_at_cut", {}).get(cut_s)
        if rec is not None:
            return PinnedChampion(str(rec["version"]), dict(rec["spec"]), str(rec["forecast_table"]),
                                  str(rec.get("forecast_artifact") or ""))
    if tracking_uri is not None:
        client = _client(tracking_uri)
        found = client.search_model_versions(f"name = '{name}' and tag.champion_at_cut = '{cut_s}'")
        if found:
            mv = max(found, key=lambda v: int(v.version))
            return PinnedChampion(str(mv.version), json.loads(mv.tags.get("spec", "{}")), mv.tags.get("forecast_table", ""),
                                  mv.tags.get("forecast_artifact", ""))
    raise KeyError(f"no champion recorded for dataset {dataset!r} ({name}) at cut {cut_s}; run `volmargin train` first")


def list_registered(tracking_uri: str) -> list[dict[str, Any]]:
    """Registered models with their aliases and the key metrics of each aliased version."""
    client = _client(tracking_uri)
    out = []
    for rm in client.search_registered_models():
        aliases = dict(getattr(rm, "aliases", {}) or {})
        entry: dict[str, Any] = {"name": rm.name, "aliases": {}}
        for alias, version in sorted(aliases.items()):
            mv = client.get_model_version(rm.name, str(version))
            entry["aliases"][alias] = {
                "version": str(version),
                "model_key": mv.tags.get("model_key"),
                "cut": mv.tags.get("cut"),
                "qlike_pre_cut": mv.tags.get("qlike_pre_cut"),
                "qlike_held_out": mv.tags.get("qlike_held_out"),
                "champion_at_cut": mv.tags.get("champion_at_cut"),
            }
        out.append(entry)
    return out
