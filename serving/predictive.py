"""The predictive policy of a market: its fitted parameters from the market config (inline ``params``), from a
run (``fitted_from``: a ``volmargin run`` output folder's ``details.json``, or ``runs:/<run id>`` in MLflow), or,
with neither, fitted here on the market's own bars and cached.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["predictive_policy", "policy_kwargs", "fitted_params_from"]

log = logging.getLogger(__name__)

#: Keys of a fit's ``predictive_params`` that are diagnostics, not policy parameters.
_DIAGNOSTICS = ("alpha", "beta", "evaluations", "n_positions_fit")


def policy_kwargs(fitted: dict[str, Any]) -> dict[str, Any]:
    """``PredictivePolicy`` keyword arguments from a fit's ``predictive_params`` (as ``details.json`` holds them)."""
    kw = {k: v for k, v in fitted.items() if k not in _DIAGNOSTICS}
    if "mm_at_entry" in kw:
        kw["mm_binds"] = "entry" if float(kw.pop("mm_at_entry")) >= 0.5 else "path"
    sref = kw.get("sigma_ref")
    if sref is None or (isinstance(sref, float) and not math.isfinite(sref)):
        kw["sigma_ref"] = None
    return kw


def fitted_params_from(source: str, asset: str) -> dict[str, Any]:
    """The predictive policy's fitted parameters for ``asset`` from a run folder or ``runs:/<id>``.

    Raises
    ------
    FileNotFoundError
        No ``details.json`` there.
    KeyError
        The run has no predictive parameters for ``asset``.
    """
    if source.startswith("runs:/"):
        import tempfile

        import mlflow

        run_id = source[len("runs:/"):].strip("/").split("/")[0]
        got = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/details.json",
                                                  dst_path=tempfile.mkdtemp(prefix="vm-pred-"))
        path = Path(got)
    else:
        path = Path(source)
        path = path / "details.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"policy.fitted_from: {path} not found (expected a run folder with details.json)")
    details = json.loads(path.read_text(encoding="utf-8"))
    assets = details.get("assets", {})
    if asset not in assets or not assets[asset].get("predictive_params"):
        raise KeyError(f"policy.fitted_from: {path} has no predictive_params for asset {asset!r}; has {sorted(assets)}")
    return dict(assets[asset]["predictive_params"])


def predictive_policy(mcfg: Any, params: dict[str, Any], ctx: Any, cache_dir: str) -> Any:
    """The market's fitted ``PredictivePolicy``."""
    from margin.predictive import PredictivePolicy

    if mcfg.policy.fitted_from:
        fitted = fitted_params_from(mcfg.policy.fitted_from, mcfg.underlying)
        return PredictivePolicy(**policy_kwargs({**fitted, **params}))
    if params:
        return PredictivePolicy(**policy_kwargs(params))
    raise ValueError("policy predictive needs its fitted parameters: set policy.params or policy.fitted_from")
