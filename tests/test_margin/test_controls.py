"""Controls: floor/ceiling, change cap, MM notice (hand examples and hypothesis properties)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margin.controls import Controls, apply_controls, notice_min


class TestHandExamples:
    def test_change_cap_and_clip(self):
        c = Controls(floor=0.02, ceiling=0.3, max_change=0.25, notice_bars=0, mm_fraction=0.5)
        cp = apply_controls(np.array([0.1, 0.2, 0.2, 0.05, 0.9, 0.001]), c)
        # 0.1 -> capped at 0.125 -> 0.15625 -> down-capped at 0.1171875 -> up 0.146484375 -> down 0.10986328125
        expected = [0.1, 0.125, 0.15625, 0.1171875, 0.146484375, 0.10986328125]
        np.testing.assert_allclose(cp.im_new, expected, rtol=0, atol=1e-15)
        np.testing.assert_allclose(cp.mm_target, 0.5 * np.array(expected))
        np.testing.assert_array_equal(cp.mm_open, cp.mm_target)  # no notice: binds at once
        assert np.all(np.isnan(cp.mm_pending))

    def test_notice_delays_increase_not_decrease(self):
        c = Controls(floor=0.01, ceiling=1.0, max_change=10.0, notice_bars=2, mm_fraction=0.5)
        raw = np.array([0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.06, 0.3, 0.3])
        cp = apply_controls(raw, c)
        # target 0.05, 0.05, 0.1 (announced at bar 2) ... binds from bar 4; drop to 0.03 at bar 6 binds at once
        np.testing.assert_allclose(cp.mm_open, [0.05, 0.05, 0.05, 0.05, 0.1, 0.1, 0.03, 0.03, 0.03])
        assert cp.mm_effective_bar[2] == 4 and cp.mm_effective_bar[3] == 4
        assert cp.mm_effective_bar[7] == 9 and cp.mm_effective_bar[8] == 9
        np.testing.assert_allclose(cp.mm_pending[[2, 3, 7, 8]], [0.1, 0.1, 0.15, 0.15])
        assert cp.mm_effective_bar[0] == -1 and np.isnan(cp.mm_pending[4])

    def test_notice_min_plain_loop(self):
        rng = np.random.default_rng(42)
        x = rng.random(50)
        for k in (0, 1, 3, 60):
            ref = [min(x[max(0, t - k):t + 1]) for t in range(x.size)]
            np.testing.assert_array_equal(notice_min(x, k), ref)


class TestErrors:
    @pytest.mark.parametrize(
        ("kw", "match"),
        [
            ({"floor": 0.0}, "controls.floor must be in"),
            ({"floor": 0.2, "ceiling": 0.1}, "controls.ceiling must be in"),
            ({"max_change": 0.0}, "controls.max_change must be > 0"),
            ({"notice_bars": -1}, "controls.notice_bars must be an integer"),
            ({"notice_bars": 1.5}, "controls.notice_bars must be an integer"),
            ({"mm_fraction": 1.5}, "controls.mm_fraction must be in"),
        ],
    )
    def test_bad_controls(self, kw, match):
        with pytest.raises(ValueError, match=match):
            Controls(**kw)

    def test_bad_raw(self):
        with pytest.raises(ValueError, match="raw_im must be finite, got nan at bar 1"):
            apply_controls(np.array([0.1, np.nan]), Controls())
        with pytest.raises(ValueError, match="at least one bar"):
            apply_controls(np.array([]), Controls())


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(st.floats(1e-4, 2.0), min_size=1, max_size=60),
    floor=st.floats(0.005, 0.2),
    width=st.floats(0.0, 0.7),
    max_change=st.floats(0.01, 1.5),
    notice=st.integers(0, 6),
    frac=st.floats(0.1, 1.0),
)
def test_controls_respected(raw, floor, width, max_change, notice, frac):
    c = Controls(floor=floor, ceiling=min(floor + width, 1.0), max_change=max_change, notice_bars=notice,
                 mm_fraction=frac)
    cp = apply_controls(np.array(raw), c)
    im = cp.im_new
    eps = 1e-12
    assert np.all(im >= c.floor - eps) and np.all(im <= c.ceiling + eps)
    if im.size > 1:
        change = np.abs(im[1:] / im[:-1] - 1.0)
        assert np.all(change <= c.max_change + 1e-9)
    np.testing.assert_allclose(cp.mm_target, frac * im)
    assert np.all(cp.mm_open <= cp.mm_target + eps)  # decreases bind at once; nothing above the target
    for t in range(1, im.size):
        if cp.mm_open[t] > cp.mm_open[t - 1] + eps:
            # an increase binds only once its level was announced notice bars before (and held since)
            lo = max(0, t - notice)
            assert np.all(cp.mm_target[lo:t + 1] >= cp.mm_open[t] - eps)
    pend = ~np.isnan(cp.mm_pending)
    assert np.all(cp.mm_pending[pend] > cp.mm_open[pend])
    assert np.all(cp.mm_effective_bar[pend] > np.flatnonzero(pend))


class TestOwnMmTarget:
    def test_hand_example(self):
        # MM target of its own: floored at mm_fraction x floor, change-capped, never above the controlled IM
        c = Controls(floor=0.02, ceiling=0.5, max_change=0.5, notice_bars=0, mm_fraction=0.5)
        im = np.array([0.2, 0.2, 0.2, 0.2, 0.05])
        mm = np.array([0.05, 0.2, 0.001, 0.001, 0.04])
        cp = apply_controls(im, c, mm)
        np.testing.assert_allclose(cp.im_new, [0.2, 0.2, 0.2, 0.2, 0.1])
        # 0.05 -> up-capped 0.075 -> down-capped 0.0375 -> 0.01875 (the floor 0.01 is below) -> 0.028125 -> min(IM)
        np.testing.assert_allclose(cp.mm_target, [0.05, 0.075, 0.0375, 0.01875, 0.028125])
        np.testing.assert_allclose(cp.mm_open, cp.mm_target)

    def test_bad_mm(self):
        with pytest.raises(ValueError, match="raw_mm must be finite and > 0, got 0.0 at bar 1"):
            apply_controls(np.array([0.1, 0.1]), Controls(), np.array([0.05, 0.0]))
        with pytest.raises(ValueError, match="raw_mm must have one value per bar"):
            apply_controls(np.array([0.1, 0.1]), Controls(), np.array([0.05]))


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(st.tuples(st.floats(1e-4, 2.0), st.floats(1e-5, 1.0)), min_size=1, max_size=60),
    max_change=st.floats(0.01, 1.5),
    notice=st.integers(0, 6),
)
def test_own_mm_respects_controls(raw, max_change, notice):
    c = Controls(floor=0.02, ceiling=0.5, max_change=max_change, notice_bars=notice, mm_fraction=0.5)
    im_raw, mm_raw = (np.array(v) for v in zip(*raw, strict=True))
    cp = apply_controls(im_raw, c, mm_raw)
    eps = 1e-12
    assert np.all(cp.mm_target <= cp.im_new + eps) and np.all(cp.mm_target > 0)
    if cp.mm_target.size > 1:
        assert np.all(np.abs(cp.mm_target[1:] / cp.mm_target[:-1] - 1.0) <= c.max_change + 1e-9)
    assert np.all(cp.mm_open <= cp.mm_target + eps)
    for t in range(1, cp.mm_open.size):
        if cp.mm_open[t] > cp.mm_open[t - 1] + eps:
            assert np.all(cp.mm_target[max(0, t - notice):t + 1] >= cp.mm_open[t] - eps)
