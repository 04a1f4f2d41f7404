"""``POST /v1/margin``: portfolio JSON in, margin / health / liquidation prices out, fast enough for a service.

* Validation and parsing in one pass: a valid body is decoded by ``msgspec`` into Structs generated from the
  engine's portfolio JSON Schema (draft 2020-12) for ``$.accounts`` (the bulk of a large book;
  :func:`_struct_type` accepts only what the schema accepts: strict types, no booleans as numbers, no extra keys,
  required keys, minLength, minimum, and nothing is generated when the definitions use any other keyword), the
  other top-level keys checked by the same schema compiled once with ``fastjsonschema`` (under draft-07, whose
  semantics are the same for every keyword this schema uses) (:func:`_decoded`; 0.6 ms for a 1,000-account
  book against 6-10 ms for ``pydantic_core``'s ``validate_json``). The Structs carry the engine's defaults for
  absent fields and go straight into ``Portfolio.from_dict(..., records="attributes")``: no dict is built per
  account, position or collateral entry. Any body that pass refuses is parsed again (``pydantic_core.from_json``,
  NaN and Infinity refused, else ``json.loads``, whose errors give line and column) and checked by
  :func:`margin.validation.validate_document`, so the error message is the engine's, naming the JSON path and
  value.
* Output: :func:`margin_response` builds ``MarginResult.to_dict()``'s document from the result's arrays column by
  column, accounts as ``msgspec`` Structs (its JSON checked equal to ``to_dict()``'s in the tests);
  :func:`dump_response` serialises it with ``msgspec`` (non-finite margins are refused before, as
  ``json.dumps(allow_nan=False)`` would).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

import numpy as np

__all__ = ["parse_portfolio", "margin_response", "dump_response", "PortfolioError"]


class PortfolioError(ValueError):
    """The request body is not a valid portfolio (message names the JSON path and value)."""


class _Unsupported(Exception):
    pass


_ANNOTATIONS = {"title", "description", "$comment"}


def _struct_type(node: dict[str, Any], defs: dict[str, Any], made: dict[str, Any], depth: int = 0,
                 defaults: dict[str, Any] | None = None) -> Any:
    """A ``msgspec`` type decoding exactly what the JSON Schema ``node`` accepts, for the keywords type (object,
    array, string, number), properties, required, additionalProperties: false, items, minItems, minLength,
    minimum, exclusiveMinimum and local ``$ref`` (closed objects become Structs that refuse unknown fields and
    are not tracked by the cyclic garbage collector); an absent optional field takes its value from ``defaults``
    (by field name; ``msgspec`` does not validate a default, so an explicit ``null`` is still refused) or else
    is ``UNSET`` (``msgspec.to_builtins`` then gives back the document as sent, up to optional fields that
    carry their default value: the tests compare both with those left out); :class:`_Unsupported` for anything
    else."""
    from typing import Annotated

    import msgspec

    if depth > 20:
        raise _Unsupported("recursive $ref")
    keys = set(node) - _ANNOTATIONS
    if "$ref" in node:
        ref = node["$ref"]
        if keys != {"$ref"} or not ref.startswith("#/$defs/") or ref[8:] not in defs:
            raise _Unsupported(f"$ref {ref!r}")
        name = ref[8:]
        if name not in made:
            made[name] = _struct_type(defs[name], defs, made, depth + 1, defaults)
        return made[name]
    t = node.get("type")
    if t == "object" and keys <= {"type", "properties", "required", "additionalProperties"}:
        props, req = node.get("properties", {}), set(node.get("required", ()))
        if node.get("additionalProperties", True) is not False or not req <= set(props):
            raise _Unsupported("open object")
        fields = []
        for k, v in props.items():
            typ = _struct_type(v, defs, made, depth + 1, defaults)
            if k in req:
                fields.append((k, typ))
            elif k in (defaults or {}):
                fields.append((k, typ, defaults[k]))  # type: ignore[index]
            else:
                fields.append((k, typ | msgspec.UnsetType, msgspec.UNSET))
        return msgspec.defstruct(f"_S{len(made)}_{depth}", fields, kw_only=True, forbid_unknown_fields=True,
                                 omit_defaults=True, gc=False)
    if t == "array" and keys <= {"type", "items", "minItems"} and "items" in node:
        item = _struct_type(node["items"], defs, made, depth + 1, defaults)
        n = node.get("minItems")
        return list[item] if n is None else Annotated[list[item], msgspec.Meta(min_length=n)]  # type: ignore[valid-type]
    if t == "string" and keys <= {"type", "minLength"}:
        n = node.get("minLength")
        return str if n is None else Annotated[str, msgspec.Meta(min_length=n)]
    if t == "number" and keys <= {"type", "minimum", "exclusiveMinimum"}:
        if "minimum" not in node and "exclusiveMinimum" not in node:
            return float
        return Annotated[float, msgspec.Meta(ge=node.get("minimum"), gt=node.get("exclusiveMinimum"))]
    raise _Unsupported(f"keywords {sorted(keys)}")


@cache
def _document_decoder() -> Any | None:
    """``msgspec`` decoder of a whole portfolio body: ``$.accounts`` into Structs generated from the schema's
    ``$defs`` (:func:`_struct_type`) with the engine's :data:`margin.accounts.RECORD_DEFAULTS` for absent
    optional fields (what ``Portfolio.from_dict(..., records="attributes")`` reads), every other top-level key
    kept as raw JSON (``fastjsonschema`` checks them after), unknown top-level keys refused; None when the schema
    uses a keyword that is not translated."""
    import msgspec

    from margin.accounts import RECORD_DEFAULTS
    from margin.validation import load_schema

    schema = load_schema("portfolio")
    props, req = schema.get("properties", {}), set(schema.get("required", ()))
    if schema.get("additionalProperties", True) is not False or "accounts" not in props:
        return None
    try:
        accounts = _struct_type(props["accounts"], schema.get("$defs", {}), {}, defaults=RECORD_DEFAULTS)
    except (_Unsupported, KeyError, TypeError):
        return None
    fields = [(k, accounts if k == "accounts" else msgspec.Raw) if k in req else
              (k, (accounts if k == "accounts" else msgspec.Raw) | msgspec.UnsetType, msgspec.UNSET) for k in props]
    top = msgspec.defstruct("_PortfolioBody", fields, kw_only=True, forbid_unknown_fields=True)
    return msgspec.json.Decoder(top)


def _decoded(body: bytes) -> tuple[dict[str, Any], list[Any]] | None:
    """``(other top-level keys as plain JSON, accounts as Structs)`` when one pass proves ``body`` valid under the
    portfolio schema; None: the slow path decides. The accounts (the bulk of a large book) are parsed and
    checked by ``msgspec`` into Structs generated from the schema (about 5x faster than ``pydantic_core``'s
    ``validate_json`` of the same book, and no dict per record); the few other keys are parsed with ``json``
    and checked by ``fastjsonschema``; no NaN/Infinity anywhere (``msgspec`` refuses those literals as invalid
    JSON)."""
    import fastjsonschema
    import msgspec

    decoder = _document_decoder()
    if decoder is None:
        return None
    try:
        top = decoder.decode(body)
        rest = {}
        for k in top.__struct_fields__:
            v = getattr(top, k)
            if k != "accounts" and v is not msgspec.UNSET:
                rest[k] = json.loads(bytes(v))
        json.dumps(rest, allow_nan=False)  # a number beyond float range outside the accounts
        _fast_validator()({**rest, "accounts": []})
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, fastjsonschema.JsonSchemaException):
        return None
    return rest, top.accounts


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

    fast = _decoded(body)
    if fast is not None:
        rest, accounts = fast
        return _built(lambda: Portfolio.from_dict({**rest, "accounts": accounts}, records="attributes"))
    # invalid, or valid in a way the one pass does not prove: the engine's validator decides and words the error
    try:
        doc = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:  # not JSON, not UTF-8, or NaN/Infinity: the standard parser decides and words the error
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite:
            doc = json.loads(body)  # NaN/Infinity literals: let the engine's validator name the field
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise PortfolioError(f"request body is not valid JSON{where}: {getattr(exc, 'msg', exc)}") from None

    def checked() -> Any:
        validate_document(doc, "portfolio")
        return Portfolio.from_dict(doc)

    return _built(checked)


def _built(build: Any) -> Any:
    """``build()``, its schema or semantic error (JSON path and value) as a :class:`PortfolioError`."""
    try:
        return build()
    except (ValueError, KeyError, TypeError) as exc:
        raise PortfolioError(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)) from None


@cache
def _response_types() -> tuple[Any, Any]:
    """``msgspec`` Structs of one account and one subaccount of the response, fields in ``to_dict()``'s order
    (``gc=False``: a response of 1,000 accounts adds nothing for the cyclic collector to traverse)."""
    import msgspec

    sub = msgspec.defstruct("MarginSubaccount", [("id", str), ("initial_margin", float),
                                                  ("maintenance_margin", float)], gc=False)
    acct = msgspec.defstruct("MarginAccount", [
        ("account", str), ("initial_margin", float), ("maintenance_margin", float), ("collateral_value", float),
        ("unrealised_pnl", float), ("equity", float), ("health_factor", float), ("liquidation_price", float),
        ("liquidation_underlying", str | None), ("subaccounts", list), ("positions", list)], gc=False)
    return acct, sub


def margin_response(res: Any) -> dict[str, Any]:
    """The document of ``MarginResult.to_dict()``, built column by column: accounts and subaccounts are
    ``msgspec`` Structs made by ``map`` over the result's arrays (no per-account Python code; about 3x faster
    than building the dicts), whose JSON from :func:`dump_response` is ``to_dict()``'s, key for key (a
    non-finite health factor or liquidation price encodes as ``null``, as ``to_dict()`` gives ``None``).

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
    account_t, sub_t = _response_types()
    pools = res.pool_ids
    n = len(pools)
    order = np.argsort(res.pool_index, kind="stable")
    subs = list(map(sub_t, map(res.account_ids.__getitem__, order.tolist()), res.im_rows[order].tolist(),
                    res.mm_rows[order].tolist()))
    counts = np.bincount(res.pool_index, minlength=n)
    if len(subs) == n and (counts == 1).all():  # one row per account: [[s0], [s1], ...]
        sub_lists = list(map(list, zip(subs, strict=True)))
    else:
        ends = np.cumsum(counts).tolist()
        sub_lists = [subs[e - c:e] for e, c in zip(ends, counts.tolist(), strict=True)]
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for rec in res.position_liquidation:
        by_pool.setdefault(rec["pool"], []).append(rec)
    positions = [by_pool.get(pid, []) for pid in pools] if by_pool else [[] for _ in range(n)]
    accounts = list(map(account_t, pools, res.im.tolist(), res.mm.tolist(), res.collateral.tolist(),
                        res.unrealised.tolist(), res.equity.tolist(), res.health.tolist(),
                        res.liquidation_price.tolist(), res.liquidation_underlying, sub_lists, positions))
    out: dict[str, Any] = {"mode": res.mode, "scenarios": res.scenarios, "accounts": accounts}
    if res.correlation is not None:
        out["ewma_correlation"] = res.correlation.tolist()
    return out


def dump_response(out: dict[str, Any]) -> bytes:
    """Compact JSON bytes of a response document from :func:`margin_response` (``msgspec``, ~0.5 ms for 1,000
    accounts; :func:`margin_response` has refused the non-finite numbers that must not be sent, and this encoder
    writes the others, a health factor or liquidation price that does not exist, as ``null``)."""
    return _encoder().encode(out)


@cache
def _encoder() -> Any:
    import msgspec

    return msgspec.json.Encoder()
