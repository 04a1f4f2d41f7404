"""``POST /v1/margin``: portfolio JSON in, margin / health / liquidation prices out, fast enough for a service.

* Validation: the engine's portfolio JSON Schema (draft 2020-12) compiled once with ``fastjsonschema`` (under
  draft-07, whose semantics are the same for every keyword this schema uses: type, properties, required,
  additionalProperties, items, minItems, enum, const, minLength, pattern, exclusiveMinimum, allOf, if/then,
  $ref). The ``accounts`` array (the bulk of a large book) is checked instead by a ``pydantic_core``
  validator generated from the same schema's ``$defs`` (:func:`_accounts_validator`; it accepts only what the
  schema accepts: strict types, no booleans as numbers, no extra keys, required keys, minLength, minimum, and
  it is not built at all when those definitions use any other keyword); the rest of the document still goes
  through ``fastjsonschema``. Only when a fast check fails (or the body holds NaN/Infinity) is
  :func:`margin.validation.validate_document` run, so the error message is the engine's, naming the JSON path
  and value.
* Parsing: a valid body is parsed and its ``accounts`` validated in one pass from the bytes
  (:func:`_validated_json`: ``SchemaValidator.validate_json``, Rust; about 15 % less than parsing with
  ``pydantic_core.from_json`` and then validating the Python objects); any body that pass refuses is parsed again
  with ``pydantic_core.from_json`` (NaN and Infinity refused) or ``json.loads`` and checked as above, so the
  error messages are the same.
* Output: :func:`margin_response` builds the same document as ``MarginResult.to_dict()`` from the result's
  arrays without the per-account scans (checked equal in the tests); :func:`dump_response` serialises it
  with ``pydantic_core.to_json`` (non-finite numbers are refused before, as ``json.dumps(allow_nan=False)``
  would).
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from typing import Any

import numpy as np

__all__ = ["parse_portfolio", "margin_response", "dump_response", "PortfolioError"]


class PortfolioError(ValueError):
    """The request body is not a valid portfolio (message names the JSON path and value)."""


class _Unsupported(Exception):
    pass


_ANNOTATIONS = {"title", "description", "$comment"}


def _core_schema(node: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    """A strict pydantic-core schema accepting exactly what the JSON Schema ``node`` accepts, for the keywords
    type (object, array, string, number), properties, required, additionalProperties: false, items, minItems,
    minLength, minimum, exclusiveMinimum and local ``$ref``; :class:`_Unsupported` for anything else."""
    from pydantic_core import core_schema as cs

    if depth > 20:
        raise _Unsupported("recursive $ref")
    keys = set(node) - _ANNOTATIONS
    if "$ref" in node:
        ref = node["$ref"]
        if keys != {"$ref"} or not ref.startswith("#/$defs/") or ref[8:] not in defs:
            raise _Unsupported(f"$ref {ref!r}")
        return _core_schema(defs[ref[8:]], defs, depth + 1)
    t = node.get("type")
    if t == "object" and keys <= {"type", "properties", "required", "additionalProperties"}:
        props, req = node.get("properties", {}), set(node.get("required", ()))
        if node.get("additionalProperties", True) is not False or not req <= set(props):
            raise _Unsupported("open object")
        fields = {k: cs.typed_dict_field(_core_schema(v, defs, depth + 1), required=k in req) for k, v in props.items()}
        return cs.typed_dict_schema(fields, extra_behavior="forbid", strict=True)
    if t == "array" and keys <= {"type", "items", "minItems"} and "items" in node:
        return cs.list_schema(_core_schema(node["items"], defs, depth + 1), min_length=node.get("minItems"), strict=True)
    if t == "string" and keys <= {"type", "minLength"}:
        return cs.str_schema(min_length=node.get("minLength"), strict=True)
    if t == "number" and keys <= {"type", "minimum", "exclusiveMinimum"}:
        return cs.float_schema(ge=node.get("minimum"), gt=node.get("exclusiveMinimum"), strict=True,
                               allow_inf_nan=False)
    raise _Unsupported(f"keywords {sorted(keys)}")


@cache
def _accounts_validator() -> Any | None:
    """pydantic-core validator of ``$.accounts`` from the portfolio schema, or None when its definitions use a
    keyword :func:`_core_schema` does not translate (then the whole document goes through ``fastjsonschema``)."""
    from pydantic_core import SchemaValidator

    from margin.validation import load_schema

    schema = load_schema("portfolio")
    try:
        return SchemaValidator(_core_schema(schema["properties"]["accounts"], schema.get("$defs", {})))
    except (_Unsupported, KeyError):
        return None


@cache
def _document_validator() -> Any | None:
    """pydantic-core validator of a whole portfolio body in one pass from the JSON bytes: ``$.accounts`` checked
    as by :func:`_accounts_validator`, every other key passed through (``fastjsonschema`` checks them after)."""
    from pydantic_core import SchemaValidator
    from pydantic_core import core_schema as cs

    from margin.validation import load_schema

    schema = load_schema("portfolio")
    try:
        accounts = _core_schema(schema["properties"]["accounts"], schema.get("$defs", {}))
    except (_Unsupported, KeyError):
        return None
    return SchemaValidator(cs.typed_dict_schema({"accounts": cs.typed_dict_field(accounts, required=True)},
                                                extra_behavior="allow"))


def _validated_json(body: bytes) -> Any | None:
    """The document of ``body`` when one pass proves it valid under the portfolio schema (parse and ``$.accounts``
    in Rust, the few other keys by ``fastjsonschema``, no NaN/Infinity anywhere); None: the slow path decides."""
    import fastjsonschema

    validator = _document_validator()
    if validator is None:
        return None
    try:
        doc = validator.validate_json(body)
        rest = {k: v for k, v in doc.items() if k != "accounts"}
        json.dumps(rest, allow_nan=False)  # a non-finite number outside the accounts
        _fast_validator()({**rest, "accounts": []})
    except (ValueError, TypeError, fastjsonschema.JsonSchemaException):
        return None
    return doc


def _fast_check(doc: Any) -> bool:
    """True when ``doc`` is valid under the portfolio schema (False: it may not be; the slow path decides)."""
    import fastjsonschema
    from pydantic_core import ValidationError

    accounts = _accounts_validator()
    try:
        if accounts is not None and isinstance(doc, dict) and isinstance(doc.get("accounts"), list):
            accounts.validate_python(doc["accounts"])
            _fast_validator()({**doc, "accounts": []})
        else:
            _fast_validator()(doc)
    except (fastjsonschema.JsonSchemaException, ValidationError):
        return False
    return True


@cache
def _fast_validator() -> Any:
    import fastjsonschema

    from margin.validation import load_schema

    schema = copy.deepcopy(load_schema("portfolio"))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return fastjsonschema.compile(schema)


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


class _NonFinite(Exception):
    pass


def parse_portfolio(body: bytes) -> Any:
    """Parse and validate a portfolio body; returns a :class:`margin.accounts.Portfolio`.

    Raises
    ------
    PortfolioError
        Malformed JSON (line and column), a non-finite number, or a schema/semantic error (JSON path and value).
    """
    import pydantic_core

    from margin.accounts import Portfolio
    from margin.validation import validate_document

    slow = False
    doc = _validated_json(body)
    try:
        if doc is not None:
            return Portfolio.from_dict(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise PortfolioError(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)) from None
    try:
        doc = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:  # not JSON, not UTF-8, or NaN/Infinity: the standard parser decides and words the error
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite:
            doc = json.loads(body)  # NaN/Infinity literals: let the engine's validator name the field
            slow = True
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise PortfolioError(f"request body is not valid JSON{where}: {getattr(exc, 'msg', exc)}") from None
    if not slow:
        slow = not _fast_check(doc)
    try:
        if slow:
            validate_document(doc, "portfolio")
        return Portfolio.from_dict(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise PortfolioError(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)) from None


def _f(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def margin_response(res: Any) -> dict[str, Any]:
    """``MarginResult.to_dict()``, computed from the arrays in one pass (same keys, order and values).

    Raises
    ------
    ValueError
        A non-finite margin, collateral, P&L or equity (never sent as JSON).
    """
    checks = {"im": res.im, "mm": res.mm, "collateral": res.collateral, "unrealised": res.unrealised,
              "equity": res.equity, "im_rows": res.im_rows, "mm_rows": res.mm_rows}
    if res.correlation is not None:
        checks["correlation"] = res.correlation
    if res.position_margin is not None and res.positions is not None:
        checks["position_margin"] = res.position_margin[res.positions != 0]
    for name, arr in checks.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite {name} in the margin result")
    pools = res.pool_ids
    order = np.argsort(res.pool_index, kind="stable")
    starts = np.searchsorted(res.pool_index[order], np.arange(len(pools) + 1))
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for rec in res.position_liquidation:
        by_pool.setdefault(rec["pool"], []).append(rec)
    im, mm, coll, upnl, eq = (a.tolist() for a in (res.im, res.mm, res.collateral, res.unrealised, res.equity))
    hf, lp = res.health.tolist(), res.liquidation_price.tolist()
    im_rows, mm_rows = res.im_rows.tolist(), res.mm_rows.tolist()
    accounts = []
    for k, pid in enumerate(pools):
        rows = order[starts[k]:starts[k + 1]].tolist()
        accounts.append({
            "account": pid,
            "initial_margin": float(im[k]),
            "maintenance_margin": float(mm[k]),
            "collateral_value": float(coll[k]),
            "unrealised_pnl": float(upnl[k]),
            "equity": float(eq[k]),
            "health_factor": _f(hf[k]),
            "liquidation_price": _f(lp[k]),
            "liquidation_underlying": res.liquidation_underlying[k],
            "subaccounts": [{"id": res.account_ids[r], "initial_margin": float(im_rows[r]),
                             "maintenance_margin": float(mm_rows[r])} for r in rows],
            "positions": by_pool.get(pid, []),
        })
    out: dict[str, Any] = {"mode": res.mode, "scenarios": res.scenarios, "accounts": accounts}
    if res.correlation is not None:
        out["ewma_correlation"] = res.correlation.tolist()
    return out



def dump_response(out: dict[str, Any]) -> bytes:
    """Compact JSON bytes of a response document from :func:`margin_response` (``pydantic_core.to_json``;
    that function has refused non-finite numbers, which this serialiser would write as ``NaN``)."""
    import pydantic_core

    return pydantic_core.to_json(out)
