"""Walk-forward splits: no training target overlaps a test row (hypothesis), windows, refit, cut tags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.splits import Fold, purge_mask, walk_forward_splits


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(20, 400),
    test_size=st.integers(1, 40),
    min_train=st.integers(1, 60),
    horizon=st.integers(1, 15),
    embargo=st.integers(0, 10),
    refit_every=st.integers(1, 4),
    rolling=st.booleans(),
    train_size=st.integers(1, 80),
)
def test_no_training_target_overlaps_any_test_row(n, test_size, min_train, horizon, embargo, refit_every, rolling,
                                                  train_size) -> None:
    if min_train + horizon + embargo >= n:
        with pytest.raises(ValueError, match="not enough rows"):
            walk_forward_splits(n, test_size=test_size, min_train=min_train, horizon=horizon, embargo=embargo)
        return
    folds = walk_forward_splits(n, test_size=test_size, min_train=min_train, horizon=horizon, embargo=embargo,
                                refit_every=refit_every, window="rolling" if rolling else "expanding",
                                train_size=train_size)
    covered = np.concatenate([f.test_idx for f in folds])
    # test blocks tile the data after the first training window, in order, without overlap
    np.testing.assert_array_equal(covered, np.arange(min_train + horizon + embargo, n))
    for f in folds:
        a, b = int(f.test_idx[0]), int(f.test_idx[-1])
        for t in f.train_idx:
            target = set(range(t + 1, t + horizon + 1))
            assert not target & set(range(a, b + 1)), (f.fold, t)
            assert t + horizon + embargo < a  # purge + embargo buffer
        assert f.train_idx.size >= (min(min_train, train_size) if rolling else min_train)
        if rolling:
            assert f.train_idx.size <= train_size
    assert [f.refit for f in folds] == [j % refit_every == 0 for j in range(len(folds))]


def test_exact_layout_expanding() -> None:
    folds = walk_forward_splits(20, test_size=5, min_train=6, horizon=2, embargo=1)
    assert [(int(f.test_idx[0]), int(f.test_idx[-1])) for f in folds] == [(9, 13), (14, 18), (19, 19)]
    np.testing.assert_array_equal(folds[0].train_idx, np.arange(0, 6))  # rows 6 (embargo), 7, 8 (purge) out
    np.testing.assert_array_equal(folds[1].train_idx, np.arange(0, 11))


def test_rolling_and_refit_reuse() -> None:
    folds = walk_forward_splits(40, test_size=4, min_train=10, horizon=1, window="rolling", refit_every=3)
    assert all(f.train_idx.size == 10 for f in folds)
    np.testing.assert_array_equal(folds[1].train_idx, folds[0].train_idx)  # not refit: reuse
    assert folds[3].refit and folds[3].train_idx[0] > folds[0].train_idx[0]


def test_cut_tags() -> None:
    idx = pd.date_range("2024-01-01", periods=60, freq="1D", tz="UTC")
    folds = walk_forward_splits(idx, test_size=10, min_train=10, cut="2024-02-01")
    tags = [(f.test_start.date().isoformat(), f.tag) for f in folds]
    assert all(tag == "pre_cut" for s, tag in tags if s < "2024-02-01")
    assert all(tag == "held_out" for s, tag in tags if s >= "2024-02-01")
    assert {t for _, t in tags} == {"pre_cut", "held_out"}
    assert folds[0].to_dict()["test_start_time"] == "2024-01-12T00:00:00+00:00"


def test_errors() -> None:
    with pytest.raises(ValueError, match="test_size must be an integer >= 1, got 0"):
        walk_forward_splits(10, test_size=0, min_train=2)
    with pytest.raises(ValueError, match="cut needs a DatetimeIndex"):
        walk_forward_splits(10, test_size=2, min_train=2, cut="2024-01-01")
    with pytest.raises(ValueError, match="window must be"):
        walk_forward_splits(10, test_size=2, min_train=2, window="sliding")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="training rows must precede"):
        Fold(0, np.array([5]), np.array([3, 4]), True, "pre_cut")


@given(st.lists(st.integers(0, 100), min_size=1, max_size=50, unique=True), st.integers(10, 60),
       st.integers(0, 20), st.integers(1, 10), st.integers(0, 5))
def test_purge_mask_property(train, a, length, horizon, embargo) -> None:
    b = a + length
    keep = purge_mask(np.array(train), a, b, horizon, embargo)
    for t, k in zip(train, keep, strict=True):
        overlap = (t + 1 <= b) and (t + horizon >= a - embargo)
        inside = a <= t <= b
        assert k == (not overlap and not inside)
