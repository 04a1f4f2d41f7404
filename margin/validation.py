"""JSON Schema validation and loading of params files and portfolios.

The schemas (draft 2020-12) ship inside the package (``margin/schemas/``, identical copies in the repo's
top-level ``schemas/``) and are loaded with :mod:`importlib.resources`, so they work from the repo, an
editable install and a wheel. Every error is a ``ValueError`` naming the JSON path and the value:
``$.accounts[0].positions[1].size: 'ten' is not of type 'number' (got 'ten')``.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from margin.accounts import Portfolio
from margin.params import ParamsFile

__all__ = [
    "SCHEMAS",
    "load_schema",
    "validate_document",
    "load_json",
    "load_params_file",
    "load_portfolio",
    "json_path",
]

SCHEMAS = ("margin_params", "params_file", "portfolio")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema ``name`` (one of :data:`SCHEMAS`) as a dict."""
    if name not in SCHEMAS:
        raise ValueError(f"schema must be one of {list(SCHEMAS)}, got {name!r}")
    text = resources.files("margin.schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator(name: str) -> Draft202012Validator:
    registry = Registry().with_resources(
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in SCHEMAS
    )
    # relative refs ("margin_params.schema.json") resolve against each schema's $id
    return Draft202012Validator(load_schema(name), registry=registry)


def json_path(parts: Any) -> str:
    """``$.a[0].b`` from a sequence of keys/indices."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _non_finite(doc: Any, path: tuple = ()) -> tuple[tuple, float] | None:
    if isinstance(doc, float) and not math.isfinite(doc):
        return path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            hit = _non_finite(v, path + (k,))
            if hit:
                return hit
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            hit = _non_finite(v, path + (i,))
            if hit:
                return hit
    return None


def validate_document(doc: Any, schema: str) -> None:
    """Validate ``doc`` against a schema; raise ``ValueError`` with the JSON path and value of the first error.

    NaN and infinities are rejected first (JSON has no such numbers; Python's ``json`` accepts them).
    """
    bad = _non_finite(doc)
    if bad:
        raise ValueError(f"{json_path(bad[0])}: must be a finite number, got {bad[1]}")
    errors = list(_validator(schema).iter_errors(doc))
    if errors:
        # the deepest error names the offending field most precisely (oneOf/anyOf report at the parent)
        e = max(errors, key=lambda x: len(x.absolute_path))
        if e.context:
            e = max(e.context, key=lambda x: len(x.absolute_path))
        raise ValueError(f"{json_path(e.absolute_path)}: {e.message} (got {json.dumps(e.instance)[:80]})")


def load_json(path: str | Path) -> Any:
    """Read a JSON file (``FileNotFoundError`` if missing, ``ValueError`` naming the line if malformed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_params_file(path: str | Path) -> ParamsFile:
    """Load, validate (schema + MarginParams rules) and build a params file."""
    doc = load_json(path)
    try:
        validate_document(doc, "params_file")
        return ParamsFile.from_dict(doc)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_portfolio(path: str | Path) -> Portfolio:
    """Load, validate and build a portfolio file."""
    doc = load_json(path)
    try:
        validate_document(doc, "portfolio")
        return Portfolio.from_dict(doc)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
