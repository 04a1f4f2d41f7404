"""The feed store: signed records per market in SQLite (WAL), appended atomically.

One table holds every record ever published (``records``: market, update id, validity, fallback flag, the
signed document as canonical JSON); the current record of a market is the one with the highest update id.
:meth:`FeedStore.append` reads the current record, lets the caller build and sign the next one from it, and
inserts it in one ``BEGIN IMMEDIATE`` transaction, so update ids are monotonic even with several publishers,
and a crash anywhere before ``COMMIT`` leaves the previous record current (SQLite rolls the journal back on
the next open). A second table holds the admin pause flag per market.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.feed import canonical_json

__all__ = ["FeedStore", "StoredRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    market TEXT NOT NULL,
    update_id INTEGER NOT NULL,
    valid_from INTEGER NOT NULL,
    valid_until INTEGER NOT NULL,
    fallback INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (market, update_id)
);
CREATE TABLE IF NOT EXISTS market_state (
    market TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    changed_at TEXT NOT NULL
);
"""


class StoredRecord(dict):  # type: ignore[type-arg]
    """A signed record document (a ``dict``) with the raw JSON text it was stored as (``.text``)."""

    text: str

    @classmethod
    def from_text(cls, text: str) -> StoredRecord:
        out = cls(json.loads(text))
        out.text = text
        return out


class FeedStore:
    """SQLite store of signed feed records.

    Parameters
    ----------
    path : str or Path
        Database file (created with its folder); default of the CLI: ``artifacts/feed.db``.
    timeout_s : float
        How long a writer waits for another writer's lock.

    Notes
    -----
    Connections are per thread (SQLite objects must not cross threads); WAL lets readers (the service) go on
    while a publisher writes.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"feed store path must be a file, got the folder {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        con = self._con()
        con.executescript(_SCHEMA)

    # ------------------------------------------------------------------ connections
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"feed store {self.path} is not a usable SQLite database: {exc}") from None
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
            self._local.cache = None

    # ------------------------------------------------------------------ reads
    def current_cached(self, market: str) -> StoredRecord | None:
        """:meth:`current`, from a per-thread in-memory copy while the database is unchanged.

        The copy is dropped when another connection (another thread or process: ``volmargin publish``, an admin
        publish) has committed since it was read (SQLite's ``PRAGMA data_version``, one cheap statement) or
        when this connection appended a record; a hit costs no query of the records table and no JSON
        parsing. Callers must not modify the returned record.
        """
        local = self._local
        version = self._con().execute("PRAGMA data_version").fetchone()[0]
        cache = getattr(local, "cache", None)
        if cache is None or getattr(local, "version", None) != version:
            cache = local.cache = {}
            local.version = version
        try:
            return cache[market]
        except KeyError:
            rec = cache[market] = self.current(market)
            return rec

    def current(self, market: str) -> StoredRecord | None:
        """The record with the highest update id of ``market`` (None when nothing was published)."""
        row = self._con().execute(
            "SELECT doc FROM records WHERE market = ? ORDER BY update_id DESC LIMIT 1", (market,)
        ).fetchone()
        return None if row is None else StoredRecord.from_text(row[0])

    def last_good(self, market: str) -> StoredRecord | None:
        """The latest record of ``market`` that is not a fallback."""
        row = self._con().execute(
            "SELECT doc FROM records WHERE market = ? AND fallback = 0 ORDER BY update_id DESC LIMIT 1", (market,)
        ).fetchone()
        return None if row is None else StoredRecord.from_text(row[0])

    def history(self, market: str, *, limit: int = 100, before: int | None = None) -> list[StoredRecord]:
        """Records of ``market``, newest first (``before``: only update ids below it)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an integer in [1, 1000], got {limit!r}")
        q = "SELECT doc FROM records WHERE market = ?"
        args: list[Any] = [market]
        if before is not None:
            q += " AND update_id < ?"
            args.append(int(before))
        q += " ORDER BY update_id DESC LIMIT ?"
        args.append(limit)
        return [StoredRecord.from_text(r[0]) for r in self._con().execute(q, args).fetchall()]

    def markets(self) -> list[str]:
        return [r[0] for r in self._con().execute("SELECT DISTINCT market FROM records ORDER BY market")]

    def is_paused(self, market: str) -> tuple[bool, str | None]:
        row = self._con().execute("SELECT paused, reason FROM market_state WHERE market = ?", (market,)).fetchone()
        return (False, None) if row is None else (bool(row[0]), row[1])

    def integrity_ok(self) -> bool:
        return self._con().execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ------------------------------------------------------------------ writes
    def set_paused(self, market: str, paused: bool, reason: str | None = None) -> None:
        """Pause (or resume) publishing for ``market``."""
        self._con().execute(
            "INSERT INTO market_state (market, paused, reason, changed_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(market) DO UPDATE SET paused = excluded.paused, reason = excluded.reason, "
            "changed_at = excluded.changed_at",
            (market, int(bool(paused)), reason, datetime.now(UTC).isoformat(timespec="seconds")),
        )

    def append(
        self,
        market: str,
        build: Callable[[StoredRecord | None, StoredRecord | None], Mapping[str, Any] | None],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> StoredRecord | None:
        """Build the next record of ``market`` from the current one and store it, atomically.

        Parameters
        ----------
        market : str
        build : callable
            ``build(current, last_good) -> signed document`` (or None to store nothing); runs inside the
            write transaction, so no other publisher can slip an update id in between.
        before_commit : callable, optional
            Called after the insert, before ``COMMIT`` (a hook for fault-injection tests).

        Returns
        -------
        StoredRecord or None
            The stored record (None when ``build`` returned None).

        Raises
        ------
        ValueError
            The document's market or update id is not the next one.
        """
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            cur = self.current(market)
            good = self.last_good(market)
            doc = build(cur, good)
            if doc is None:
                con.execute("ROLLBACK")
                return None
            if doc.get("market") != market:
                raise ValueError(f"record market {doc.get('market')!r} does not match {market!r}")
            want = 1 if cur is None else int(cur["update_id"]) + 1
            if doc.get("update_id") != want:
                raise ValueError(f"record update_id must be {want} for {market}, got {doc.get('update_id')!r}")
            text = canonical_json(dict(doc))
            msg = doc["message"]
            con.execute(
                "INSERT INTO records (market, update_id, valid_from, valid_until, fallback, created_at, doc) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (market, want, int(msg["validFrom"]), int(msg["validUntil"]), int(bool(doc["fallback"])),
                 datetime.now(UTC).isoformat(timespec="seconds"), text),
            )
            if before_commit is not None:
                before_commit()
            con.execute("COMMIT")
            self._local.cache = None  # this connection's own commits do not change its data_version
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return StoredRecord.from_text(text)
