"""The SQLite feed store: monotonic update ids, history, pause, and a crash before COMMIT (in a separate
process killed with os._exit) leaving the previous record current."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest
from serving_test_helpers import KEY_HEX

from margin.params import MarginParams
from serving.feed import FeedDomain, FeedRecord, sign_record
from serving.store import FeedStore

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
HERE = __import__("pathlib").Path(__file__).resolve().parent
DOMAIN = FeedDomain(chain_id=1, verifying_contract="0x" + "11" * 20)


def signed(market: str, update_id: int, im: float = 0.1) -> dict:
    p = MarginParams(market_id="BTC", im_rate=im, mm_rate=im / 2, valid_from=datetime(2024, 1, 1, tzinfo=UTC),
                     valid_until=datetime(2024, 1, 2, tzinfo=UTC))
    rec = FeedRecord(market=market, update_id=update_id, params=p, forecast={}, previous=None, fallback=False,
                     fallback_reason=None, lineage={})
    return sign_record(rec, DOMAIN, KEY_HEX)


def test_append_current_history(tmp_path):
    st = FeedStore(tmp_path / "f.db")
    assert st.current("BTC-PERP") is None
    for i in range(1, 4):
        st.append("BTC-PERP", lambda cur, good, i=i: signed("BTC-PERP", i, 0.1 + i / 100))
    assert st.current("BTC-PERP")["update_id"] == 3
    assert [r["update_id"] for r in st.history("BTC-PERP", limit=2)] == [3, 2]
    assert [r["update_id"] for r in st.history("BTC-PERP", before=2)] == [1]
    with pytest.raises(ValueError, match="record update_id must be 4 for BTC-PERP, got 2"):
        st.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 2))
    with pytest.raises(ValueError, match="limit must be an integer in"):
        st.history("BTC-PERP", limit=0)
    assert st.current("BTC-PERP")["update_id"] == 3 and st.integrity_ok()
    st.set_paused("BTC-PERP", True, "maintenance")
    assert st.is_paused("BTC-PERP") == (True, "maintenance")
    st.set_paused("BTC-PERP", False)
    assert st.is_paused("BTC-PERP") == (False, None)


def test_exception_before_commit_rolls_back(tmp_path):
    st = FeedStore(tmp_path / "f.db")
    st.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 1))

    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        st.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 2), before_commit=boom)
    assert st.current("BTC-PERP")["update_id"] == 1


def test_process_killed_between_insert_and_commit_keeps_previous(tmp_path):
    db = tmp_path / "f.db"
    st = FeedStore(db)
    st.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 1))
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from serving.store import FeedStore
        sys.path.insert(0, {str(HERE)!r})
        from test_feed_store import signed
        st = FeedStore({str(db)!r})
        st.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 2), before_commit=lambda: os._exit(137))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137, proc.stderr
    fresh = FeedStore(db)
    assert fresh.current("BTC-PERP")["update_id"] == 1
    assert fresh.integrity_ok()
    fresh.append("BTC-PERP", lambda cur, good: signed("BTC-PERP", 2))
    assert fresh.current("BTC-PERP")["update_id"] == 2


def test_bad_path(tmp_path):
    with pytest.raises(ValueError, match="feed store path must be a file"):
        FeedStore(tmp_path)
    bad = tmp_path / "x.db"
    bad.write_text("not sqlite at all" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        FeedStore(bad)
