"""The stage rules are an import-linter contract: kept by the tree, and broken by each kind of violation.

The violation tests copy the packages into a temporary folder, add one forbidden import to one module and run
``lint-imports`` there with the project's own contracts (pyproject.toml): it must fail and name the contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("data_pipelines", "models", "training", "margin", "backtest", "stress", "serving", "volmargin")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tree_keeps_every_contract():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_no_module_level_getattr_or_reexport_shims():
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            assert "\ndef __getattr__(" not in text, f"module-level __getattr__ redirect in {f}"
            assert "stay importable" not in text, f"re-export shim in {f}"


def test_margin_never_imports_backtest():
    for f in (ROOT / "margin").rglob("*.py"):
        for line in f.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith(("from backtest", "import backtest"))), f"{f}: {s}"


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("tree")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.sol"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("margin/policies.py", "import backtest.simulation", "margin imports only models and data_pipelines"),
        ("backtest/fit.py", "import training.metrics", "backtest never imports training"),
        ("stress/cascade.py", "import training.metrics", "stress never imports training"),
        ("backtest/headline.py", "import stress.cascade", "Stages import only earlier stages"),
        ("models/ewma.py", "import margin.controls", "models imports neither"),
        ("data_pipelines/features.py", "import models.base", "Stages import only earlier stages"),
        ("training/metrics.py", "import margin.controls", "Stages import only earlier stages"),
        ("margin/path.py", "import margin.policies", "No import cycles between the modules of a package"),
    ],
)
def test_each_violation_breaks_a_contract(tree_copy, module, line, contract):
    f = tree_copy / module
    original = f.read_text()
    try:
        f.write_text(original + f"\n{line}  # injected by the test\n")
        res = _lint(tree_copy)
    finally:
        f.write_text(original)
    assert res.returncode != 0, res.stdout
    broken = res.stdout.split("Broken contracts")[-1] if "Broken contracts" in res.stdout else res.stdout
    assert contract in " ".join(broken.split()), res.stdout
