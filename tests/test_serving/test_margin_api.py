"""The fast path of ``POST /v1/margin``: the one-pass decoder generated from the schema accepts exactly what
the schema accepts (random mutations of a valid book: every verdict equals ``fastjsonschema``'s on the whole
document, the engine's ``jsonschema`` validation agrees, and the decoded document is the one sent); refused
bodies get the engine's error messages; the response serialiser refuses non-finite numbers."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from margin.accounts import RECORD_DEFAULTS, Portfolio
from margin.validation import validate_document
from serving.loadgen import portfolio_doc
from serving.margin_api import (
    PortfolioError,
    _decoded,
    _document_decoder,
    _fast_validator,
    dump_response,
    parse_portfolio,
)


def _base() -> dict:
    doc = portfolio_doc(4, seed=3)
    doc["accounts"][1]["subaccounts"] = [{"id": "acct-000001/opt", "collateral": [{"asset": "USDC", "amount": 10.0}],
                                          "positions": [{"instrument": "ETH-PERP", "size": -1.5,
                                                                        "entry_price": 3000.0}]}]
    return doc


BASE = _base()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ACCOUNT_PATHS = [p for p in _paths(BASE["accounts"], ("accounts",))]
KEYS = ["id", "collateral", "positions", "subaccounts", "asset", "chain", "amount", "instrument", "size",
        "entry_price", "extra"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-1e3, 1e3, allow_nan=False) | st.text(max_size=2),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c, max_size=3),
    max_leaves=6,
)


def _verdict_full(doc) -> bool:
    import fastjsonschema

    try:
        _fast_validator()(doc)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def _verdict_engine(doc) -> bool:
    try:
        validate_document(doc, "portfolio")
    except ValueError:
        return False
    return True


def _validated_json(body: bytes):
    """The document the one pass decodes from ``body`` as plain JSON (optional fields sent with the engine's
    default value left out), None where it refuses the body."""
    import msgspec

    got = _decoded(body)
    return None if got is None else {**got[0], "accounts": msgspec.to_builtins(got[1])}


def _without_defaults(node):
    """``node`` less the optional record fields that carry :data:`RECORD_DEFAULTS`' value (what they mean when
    absent; an empty list for an empty tuple), so that two documents that mean the same compare equal."""
    def default(k, v):
        d = RECORD_DEFAULTS.get(k, ...)
        return v is d or (type(v) is type(d) and v == d) or (d == () and v == [])

    if isinstance(node, list):
        return [_without_defaults(x) for x in node]
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if not default(k, v)}
    return node


def _one_pass(doc) -> bool:
    return _validated_json(json.dumps(doc).encode()) is not None


def test_accounts_decoder_is_generated_from_the_schema():
    assert _document_decoder() is not None
    assert _one_pass(BASE) and _verdict_full(BASE) and _verdict_engine(BASE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ACCOUNT_PATHS), op=st.sampled_from(["replace", "delete", "add"]), value=json_values,
       key=st.sampled_from(KEYS))
def test_one_pass_agrees_with_the_schema(path, op, value, key):
    doc = copy.deepcopy(BASE)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "delete":
        parent.pop(last)
    else:
        target = parent[last]
        if isinstance(target, dict):
            target[key] = value
        elif isinstance(target, list):
            target.append(value)
        else:
            parent[last] = [value]
    one_pass = _validated_json(json.dumps(doc).encode())  # parse + validate from the bytes: same verdict, same doc
    fast = one_pass is not None
    assert fast == _verdict_full(doc), (path, op, value)
    if fast:
        assert _verdict_engine(doc)
        assert _without_defaults(one_pass) == _without_defaults(doc)
        try:  # the portfolio built from the Structs is the one built from the plain document, array for array
            want = Portfolio.from_dict(doc)
        except ValueError as exc:  # a semantic error: the same message
            with pytest.raises(PortfolioError) as err:
                parse_portfolio(json.dumps(doc).encode())
            assert str(err.value) == str(exc)
        else:
            got = parse_portfolio(json.dumps(doc).encode())
            assert (got.account_ids, got.pool_ids, got.slots) == (want.account_ids, want.pool_ids, want.slots)
            for name in ("pool_index", "positions", "entry", "balances"):
                assert np.array_equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", [b'"LTC": 100.0', b'"amount": 10.0', b'"size": -1.5'])
def test_one_pass_refuses_non_finite_numbers_anywhere(literal, where):
    body = json.dumps(BASE).encode()
    assert where in body
    bad = body.replace(where, where.split(b":")[0] + b": " + literal.encode(), 1)
    assert _validated_json(bad) is None
    with pytest.raises(PortfolioError, match="finite"):
        parse_portfolio(bad)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["accounts"][0]["positions"][0].update(size=True), "size"),
        (lambda d: d["accounts"][0]["collateral"][0].update(amount=-1.0), "amount"),
        (lambda d: d["accounts"][0].update(id=""), "id"),
        (lambda d: d["accounts"][1]["subaccounts"][0].update(subaccounts=[]), "subaccounts"),
        (lambda d: d["accounts"][2].pop("id"), "id"),
        (lambda d: d["instruments"][0].update(kind="swap"), "kind"),
    ],
)
def test_rejected_books_get_the_engines_message(mutate, where):
    doc = copy.deepcopy(BASE)
    mutate(doc)
    assert not _one_pass(doc)
    with pytest.raises(PortfolioError) as err:
        parse_portfolio(json.dumps(doc).encode())
    with pytest.raises(ValueError) as ref:
        validate_document(doc, "portfolio")
    assert str(err.value) == str(ref.value) and where in str(err.value)


def test_parsing_matches_json_and_keeps_error_messages():
    body = json.dumps(BASE).encode()
    pf = parse_portfolio(body)
    assert pf.pool_ids == tuple(a["id"] for a in BASE["accounts"])
    with pytest.raises(PortfolioError, match=r"request body is not valid JSON at line 1 column 2: Expecting property"):
        parse_portfolio(b"{oops")
    bad = body.replace(b'"size": -1.5', b'"size": NaN')
    with pytest.raises(PortfolioError, match=r"accounts\[1\]\.subaccounts\[0\]\.positions\[0\]\.size"):
        parse_portfolio(bad)


def test_dump_response_round_trips_and_refuses_non_finite():
    from margin.engine import compute_margin
    from margin.params import MarginParams, ParamsFile
    from serving.margin_api import margin_response

    doc = copy.deepcopy(BASE)
    doc["accounts"].append({"id": "flat", "collateral": [{"asset": "USDC", "amount": 5.0}]})  # no MM: null health
    doc["accounts"][2]["subaccounts"] = [{"id": "s1"}, {"id": "s2", "positions": [  # two subaccounts in one pool
        {"instrument": "BTC-PERP", "size": 0.1, "entry_price": 80000.0}]}]
    pf = parse_portfolio(json.dumps(doc).encode())
    prm = ParamsFile(markets=tuple(MarginParams(market_id=u, im_rate=0.1, mm_rate=0.05) for u in ("BTC", "ETH", "LTC")))
    for mode in ("cross", "isolated", "portfolio"):
        res = compute_margin(pf, prm, mode)
        got = json.loads(dump_response(margin_response(res)))
        want = res.to_dict()
        assert json.dumps(got) == json.dumps(want, allow_nan=False)  # keys in the same order, same values
        assert got["accounts"][-1]["health_factor"] is None and len(got["accounts"][2]["subaccounts"]) == 3
        assert any(a["positions"] for a in got["accounts"]) == (mode == "isolated")
    res = compute_margin(pf, prm, "cross")
    broken = replace(res, mm=np.where(np.arange(len(res.mm)) == 0, np.nan, res.mm))
    with pytest.raises(ValueError, match="non-finite mm"):
        margin_response(broken)
