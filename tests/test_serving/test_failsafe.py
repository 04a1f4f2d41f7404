"""Change controls and failsafe of one update, checked against the consumer's rules (check_update) and by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.failsafe import PrevRates, Proposal, UpdateRules, check_update, decide_update
from serving.feed import SCALE

RULES = UpdateRules(floor=0.02, ceiling=0.5, max_change=0.25, notice_s=3600, min_interval_s=60, mm_fraction=0.5,
                    static_im=0.10, fallback_buffer=0.25)


def as_msg(d, update_id, t, valid_for=86400):
    return {"imRate": d.im, "mmRate": d.mm, "mmRatePending": d.mm_pending, "mmEffectiveFrom": d.mm_effective_from,
            "validFrom": t, "validUntil": t + valid_for, "updateId": update_id, "fallback": d.fallback, "expo": -8}


proposals = st.one_of(
    st.builds(Proposal, im=st.floats(min_value=0.001, max_value=0.9), mm=st.none()),
    st.builds(lambda im, f: Proposal(im=im, mm=im * f), st.floats(min_value=0.001, max_value=0.9),
              st.floats(min_value=0.1, max_value=1.0)),
    st.sampled_from([Proposal(im=math.nan), Proposal(im=math.inf), Proposal(im=-0.1),
                     Proposal(im=0.1, failure="model cannot load: test")]),
)


@settings(max_examples=150, deadline=None)
@given(seq=st.lists(st.tuples(proposals, st.integers(min_value=0, max_value=3 * 3600)), min_size=1, max_size=12),
       notice=st.sampled_from([0, 600, 3600]))
def test_every_decision_passes_the_consumer_checks(seq, notice):
    rules = UpdateRules(**{**RULES.to_dict(), "notice_s": notice})
    t = 1_700_000_000
    prev = good = None
    uid = 0
    for prop, dt in seq:
        t += dt
        d = decide_update(prop, rules, t, prev, good)
        if d.skip:
            assert prev is not None and t - prev.valid_from < rules.min_interval_s and not d.fallback
            continue
        uid += 1
        msg = as_msg(d, uid, t)
        assert check_update(msg, prev, rules, now=t) == []
        if d.fallback:
            # never below the static policy or the last good record (up to the decrease cap from above)
            assert d.im >= min(round(rules.static_im * SCALE), prev.im if prev else SCALE)
            if good is not None:
                assert d.im >= min(good.im, prev.im)
        else:
            assert rules.floor * SCALE - 1 <= d.im <= rules.ceiling * SCALE + 1 or prev is not None
        new = PrevRates.from_message(msg)
        prev = new
        if not d.fallback:
            good = new


def test_caps_by_hand():
    prev = PrevRates(update_id=1, im=10_000_000, mm=5_000_000, mm_pending=0, mm_effective_from=0,
                     valid_from=0, fallback=False)
    # IM doubles: capped at +25 %; the MM target rises: announced with an hour's notice, binding MM unchanged
    d = decide_update(Proposal(im=0.20), RULES, 100, prev, prev)
    assert (d.im, d.mm, d.mm_pending, d.mm_effective_from) == (12_500_000, 5_000_000, 6_250_000, 3700)
    assert "im change cap" in d.adjustments and "mm notice" in d.adjustments
    # IM collapses: capped at -25 %, MM follows at once within the cap
    d = decide_update(Proposal(im=0.02), RULES, 100, prev, prev)
    assert (d.im, d.mm, d.mm_pending) == (7_500_000, 3_750_000, 0)
    # the pending rate binds once its time has come
    after = PrevRates(2, 12_500_000, 5_000_000, 6_250_000, 3700, 100, False)
    assert after.mm_now(3699) == 5_000_000 and after.mm_now(3700) == 6_250_000
    # a lower pending level keeps its date, a higher one gets new notice
    d = decide_update(Proposal(im=0.115), RULES, 200, after, after)
    assert d.mm_pending == 5_750_000 and d.mm_effective_from == 3700
    d = decide_update(Proposal(im=0.15), RULES, 300, after, after)
    assert d.mm_pending == 6_250_000 and d.mm_effective_from == 3700
    # too soon: skipped (a normal update), a fallback is not
    assert decide_update(Proposal(im=0.1), RULES, 30, prev, prev).skip
    assert not decide_update(Proposal(im=math.nan), RULES, 30, prev, prev).skip


def test_fallback_by_hand():
    good = PrevRates(1, 12_000_000, 6_000_000, 0, 0, 0, False)
    d = decide_update(Proposal(im=math.nan), RULES, 100, good, good)
    assert d.fallback and "non-finite" in d.reason
    # max(static 0.10, 1.25 x last good 0.12 = 0.15): IM rises at once past the +25 % cap; MM waits for notice
    assert d.im == 15_000_000 and d.mm == 6_000_000 and d.mm_pending == 7_500_000 and d.mm_effective_from == 3700
    low = PrevRates(1, 2_000_000, 1_000_000, 0, 0, 0, False)
    d = decide_update(Proposal(im=0.1, failure="input stale"), RULES, 100, low, low)
    assert d.im == 10_000_000 and d.reason == "input stale"
    # out of the sanity bounds
    d = decide_update(Proposal(im=0.5), UpdateRules(sanity_max=0.3), 100, None, None)
    assert d.fallback and "sanity bounds" in d.reason and d.im == 10_000_000


def test_consumer_rejects_violations():
    prev = PrevRates(1, 10_000_000, 5_000_000, 0, 0, 0, False)
    base = {"imRate": 10_000_000, "mmRate": 5_000_000, "mmRatePending": 0, "mmEffectiveFrom": 0, "validFrom": 100,
            "validUntil": 1000, "updateId": 2, "fallback": False, "expo": -8}
    assert check_update(base, prev, RULES) == []
    assert any("replay" in b for b in check_update({**base, "updateId": 1}, prev, RULES))
    assert any("rises more than the cap" in b for b in check_update({**base, "imRate": 13_000_000}, prev, RULES))
    assert check_update({**base, "imRate": 13_000_000, "fallback": True}, prev, RULES) == []
    assert any("without notice" in b for b in check_update({**base, "mmRate": 6_000_000}, prev, RULES))
    assert any("notice" in b for b in check_update({**base, "mmRatePending": 6_000_000, "mmEffectiveFrom": 200},
                                                     prev, RULES))
    assert any("too soon" in b for b in check_update({**base, "validFrom": 30}, prev, RULES))


@pytest.mark.parametrize("kw,match", [
    ({"floor": 0.0}, r"controls.floor must be in \(0, 1\], got 0.0"),
    ({"ceiling": 0.01}, r"controls.ceiling must be in \[floor=0.02, 1\], got 0.01"),
    ({"max_change": 1.5}, r"controls.max_change must be in \(0, 1\), got 1.5"),
    ({"notice_s": -1}, "controls.notice_s must be an integer number of seconds >= 0, got -1"),
    ({"static_im": 2.0}, r"failsafe.static_im must be in \(0, 1\], got 2.0"),
    ({"fallback_buffer": -1.0}, "failsafe.fallback_buffer must be >= 0, got -1.0"),
])
def test_rules_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        UpdateRules(**kw)
