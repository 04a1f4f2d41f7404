"""notebooks/walkthrough.ipynb executes top to bottom (nbclient, kernel = the running interpreter).

The default check runs it on a tiny synthetic data set (a CSV written by the test, config passed through
``VOLMARGIN_NOTEBOOK_CONFIG``); the slow check runs it on its own ``notebooks/small.yaml`` (bundled LTC).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from data_pipelines.synthetic import simulate

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def _kernel_name() -> str:
    """The ``python3`` kernel: jupyter_client launches a spec whose command is ``python`` with
    ``sys.executable``, i.e. the interpreter running the tests."""
    return "python3"


def _execute(tmp_path: Path, config: Path, timeout: int) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = os.environ.get("VOLMARGIN_NOTEBOOK_CONFIG")
    os.environ["VOLMARGIN_NOTEBOOK_CONFIG"] = str(config)
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=_kernel_name(),
                                resources={"metadata": {"path": str(ROOT / "notebooks")}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("VOLMARGIN_NOTEBOOK_CONFIG", None)
        else:
            os.environ["VOLMARGIN_NOTEBOOK_CONFIG"] = env_before
    return nb


def _outputs(nb: nbformat.NotebookNode) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_walkthrough_runs_on_tiny_data(tmp_path: Path) -> None:
    csv = tmp_path / "TINY.csv"
    simulate(600, seed=4, start="2019-01-01").bars.to_csv(csv)
    ds = f"csv:{csv}"
    cfg = {
        "name": "nb-tiny", "seed": 3, "datasets": [ds], "cuts": {ds: "2020-01-01"},
        "training": {"horizon": 2, "walk_forward": {"min_train": 200, "refit_every": 100},
                     "models": [{"name": "ewma"}, {"name": "ewma", "label": "ewma80", "params": {"lam": 0.8}}]},
        "budgets": [0.2],
        "policies": {"static_pairs": {"im": [0.02, 0.08, 0.2, 0.4, 0.7], "mm_fractions": [0.5], "mm_fixed": [0.03]},
                     "predictive": {"rounds": 1, "max_positions": 300, "refine": False,
                                    "grid": {"power": [0.0, 1.0], "stress": [0.0], "omega": [0.5], "floor": [0.02],
                                             "release": [1.0], "mm_k": [0.0], "mm_floor": [0.0]}}},
        "population": {"n_positions": 300},
        "sensitivity": {"enabled": False},
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = _outputs(_execute(tmp_path, p, timeout=120))
    assert "champion (lowest pre-cut QLIKE):" in out
    assert "fitted parameters:" in out
    assert "share_of_bound" in out and "best static pair" in out


@pytest.mark.slow
def test_walkthrough_runs_on_its_small_config(tmp_path: Path) -> None:
    try:
        from data_pipelines.pipeline import prepare_dataset

        prepare_dataset("bundled:coinbase-pro/LTC")
    except FileNotFoundError as exc:
        pytest.skip(f"bundled data not installed: {exc}")
    out = _outputs(_execute(tmp_path, ROOT / "notebooks" / "small.yaml", timeout=600))
    assert "champion (lowest pre-cut QLIKE):" in out
