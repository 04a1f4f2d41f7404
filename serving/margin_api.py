"""``POST /v1/margin``: portfolio JSON in, margin / health / liquidation prices out, fast enough for a service.

* Validation: the engine's portfolio JSON Schema (draft 2020-12) compiled once with ``fastjsonschema`` (under
  draft-07, whose semantics are the same for every keyword this schema uses: type, properties, required,
  additionalProperties, items, minItems, enum, const, minLength, pattern, exclusiveMinimum, allOf, if/then,
  $ref). Only when that fast check fails (or the body holds NaN/Infinity) is
  :func:`margin.validation.validate_document` run, so the error message is the engine's, naming the JSON path
  and value.
* Output: :func:`margin_response` builds the same document as ``MarginResult.to_dict()`` from the result's
  arrays without the per-account scans (checked equal in the tests).
"""

from __future__ import annotations

import copy
import json
import math
from functools import cache
from typing import Any

import numpy as np

__all__ = ["parse_portfolio", "margin_response", "PortfolioError"]


class PortfolioError(ValueError):
    """The request body is not a valid portfolio (message names the JSON path and value)."""


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
    import fastjsonschema

    from margin.accounts import Portfolio
    from margin.validation import validate_document

    try:
        doc = json.loads(body, parse_constant=_reject_constant)
        slow = False
    except _NonFinite:
        doc = json.loads(body)  # NaN/Infinity literals: let the engine's validator name the field
        slow = True
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise PortfolioError(f"request body is not valid JSON{where}: {getattr(exc, 'msg', exc)}") from None
    if not slow:
        try:
            _fast_validator()(doc)
        except fastjsonschema.JsonSchemaException:
            slow = True
    try:
        if slow:
            validate_document(doc, "portfolio")
        return Portfolio.from_dict(doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise PortfolioError(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)) from None


def _f(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def margin_response(res: Any) -> dict[str, Any]:
    """``MarginResult.to_dict()``, computed from the arrays in one pass (same keys, order and values)."""
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
