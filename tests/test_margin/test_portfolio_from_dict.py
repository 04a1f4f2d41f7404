"""``Portfolio.from_dict``'s array fast path (``_fill_fast``) gives the position-by-position loop's arrays
(``_fill_slow``) bit for bit on random books: integer and float sizes, zero sizes without an entry price,
subaccounts, several collateral slots, netting within a row (the fast path declines it)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.accounts import Portfolio, _fill_fast, _fill_slow

INSTRUMENTS = [{"id": f"{u}-PERP", "kind": "linear_perp", "underlying": u} for u in ("BTC", "ETH")]
size = st.one_of(st.integers(-50, 50), st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False))
position = st.builds(lambda i, s, e: {"instrument": i, "size": s, **({} if e is None else {"entry_price": e})},
                     st.sampled_from(["BTC-PERP", "ETH-PERP"]), size,
                     st.one_of(st.none(), st.integers(1, 10**5), st.floats(0.01, 1e5)))
collateral = st.builds(lambda a, c, x: {"asset": a, **({} if c is None else {"chain": c}), "amount": x},
                       st.sampled_from(["USDC", "BTC"]), st.sampled_from([None, "ethereum", "arbitrum"]),
                       st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)))
book = st.fixed_dictionaries({"collateral": st.lists(collateral, max_size=3),
                              "positions": st.lists(position, max_size=3)})


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(book, st.lists(book, max_size=2)), min_size=1, max_size=6))
def test_fast_path_equals_the_loop(accounts):
    doc = {"as_of": "2026-01-01T00:00:00Z", "instruments": INSTRUMENTS,
           "marks": {"underlyings": {"BTC": 90000.0, "ETH": 3000.0}, "collateral": {"USDC": 1.0, "BTC": 90000.0}},
           "accounts": [{"id": f"a{i}", **top, "subaccounts": [{"id": f"a{i}/{j}", **s} for j, s in enumerate(subs)]}
                        for i, (top, subs) in enumerate(accounts)]}
    live = [p for a in doc["accounts"] for r in (a, *a["subaccounts"]) for p in r["positions"]]
    if any(p["size"] != 0 and "entry_price" not in p for p in live):
        return  # invalid book (an open position needs an entry price): both paths refuse it, the loop names it
    pf = Portfolio.from_dict(doc)
    rows = [(r["id"], ai, r, None if r is a else si - 1) for ai, a in enumerate(doc["accounts"])
            for si, r in enumerate((a, *a["subaccounts"]))]
    col = {x["id"]: k for k, x in enumerate(INSTRUMENTS)}
    slots = {s: k for k, s in enumerate(pf.slots)}
    inst = list(pf.instruments)
    pos, entry, bal = _fill_slow(rows, inst, col, slots)
    for got, want in ((pf.positions, pos), (pf.entry, entry), (pf.balances, bal)):
        assert np.array_equal(got, want)
    fast = _fill_fast([r[2] for r in rows], inst, col, slots)
    if fast is not None:  # declined only for netting within a row
        assert all(np.array_equal(x, y) for x, y in zip(fast, (pos, entry, bal), strict=True))


def test_subnormal_sizes_keep_their_entry_price_and_margin_without_warnings():
    import warnings

    from margin.engine import compute_margin
    from margin.params import MarginParams, ParamsFile

    prm = ParamsFile(markets=tuple(MarginParams(market_id=u, im_rate=0.1, mm_rate=0.05) for u in ("BTC", "ETH")))
    for size in (1e-310, -5e-324, 1e-300, 1e-3):
        doc = {"as_of": "2026-01-01T00:00:00Z", "instruments": INSTRUMENTS,
               "marks": {"underlyings": {"BTC": 90000.0, "ETH": 3000.0}, "collateral": {"USDC": 1.0}},
               "accounts": [{"id": "a", "collateral": [{"asset": "USDC", "amount": 100.0}],
                             "positions": [{"instrument": "BTC-PERP", "size": size, "entry_price": 80000.0}]}]}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow in the health factor of a subnormal MM
            pf = Portfolio.from_dict(doc)
            assert pf.entry[0, 0] == 80000.0 and pf.positions[0, 0] == size
            for mode in ("cross", "isolated", "portfolio"):
                res = compute_margin(pf, prm, mode)
                assert 0 < res.mm[0] <= res.im[0] and res.health[0] > 1
