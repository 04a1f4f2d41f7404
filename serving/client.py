"""A Python consumer of the feed (``volmargin watch``): polls ``GET /v1/params/{market}`` and accepts a record
only when its signature recovers to the expected signer, its content matches the signed message, it has not
expired, and its update id is above the last accepted one (a replayed or older update id is rejected; the same
record seen again is reported as unchanged). With ``rules`` it also checks the change caps against the last
accepted record, as the on-chain consumer does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serving.failsafe import PrevRates, UpdateRules, check_update
from serving.feed import FeedDomain, VerificationError, verify_record

__all__ = ["Verdict", "FeedWatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Outcome of one poll: ``status`` is ``accepted``, ``unchanged`` or ``rejected`` (``reason`` says why)."""

    status: str
    update_id: int | None
    reason: str | None = None
    record: dict[str, Any] | None = None


@dataclass
class FeedWatcher:
    """Verifying poller of one market.

    Parameters
    ----------
    base_url : str
        Service URL (``http://127.0.0.1:8000``).
    market : str
    signer : str
        The feed's signing address; records signed by any other key are rejected.
    domain : FeedDomain, optional
        Expected EIP-712 domain (chain id and contract); default: not checked.
    rules : UpdateRules, optional
        The market's change controls, checked against the last accepted record.
    """

    base_url: str
    market: str
    signer: str
    domain: FeedDomain | None = None
    rules: UpdateRules | None = None
    timeout_s: float = 5.0
    last: dict[str, Any] | None = field(default=None, init=False)

    def check(self, doc: dict[str, Any], now: datetime | None = None) -> Verdict:
        """Verify one record document against the watcher's state (updates the state when accepted)."""
        t = now or datetime.now(UTC)
        if doc.get("market") != self.market:
            return Verdict("rejected", doc.get("update_id"), f"record is for market {doc.get('market')!r}, "
                                                              f"not {self.market!r}")
        if self.last is not None and doc.get("update_id") == self.last["update_id"]:
            if doc.get("signature") == self.last.get("signature"):
                try:
                    verify_record(doc, signer=self.signer, domain=self.domain, now=t)
                except VerificationError as exc:
                    return Verdict("rejected", doc.get("update_id"), str(exc))
                return Verdict("unchanged", doc["update_id"])
        last_id = None if self.last is None else int(self.last["update_id"])
        try:
            verify_record(doc, signer=self.signer, domain=self.domain, now=t, last_update_id=last_id)
        except VerificationError as exc:
            return Verdict("rejected", doc.get("update_id"), str(exc))
        if self.rules is not None and self.last is not None:
            bad = check_update(doc["message"], PrevRates.from_message(self.last["message"]), self.rules,
                               now=int(t.timestamp()))
            if bad:
                return Verdict("rejected", doc.get("update_id"), "change controls: " + "; ".join(bad))
        self.last = doc
        return Verdict("accepted", int(doc["update_id"]), None, doc)

    def poll(self, client: Any = None) -> Verdict:
        """Fetch the current record and :meth:`check` it (HTTP errors are a rejection naming the status)."""
        import httpx

        own = client is None
        c = client or httpx.Client(base_url=self.base_url, timeout=self.timeout_s)
        try:
            r = c.get(f"/v1/params/{self.market}")
        except httpx.HTTPError as exc:
            return Verdict("rejected", None, f"request to {self.base_url} failed: {exc}")
        finally:
            if own:
                c.close()
        if r.status_code != 200:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            return Verdict("rejected", None, f"HTTP {r.status_code}: {detail}")
        try:
            doc = r.json()
        except ValueError:
            return Verdict("rejected", None, "response is not JSON")
        return self.check(doc)
