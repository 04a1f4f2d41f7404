"""The on-chain consumer (serving/contracts/MarginFeedConsumer.sol), compiled with the npm solc package and run on
an in-process EVM (eth-tester + py-evm): EIP-712 digest and recovery equal Python's, stale / replayed / tampered
/ wrongly signed records are rejected, the change caps are enforced, and every record the publisher's controls
produce is accepted."""

from __future__ import annotations

import copy
import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from eth_account import Account
from serving_test_helpers import ADDRESS, KEY_HEX, markets_doc

from margin.params import MarginParams
from serving.evm import ConsumerChain, compile_consumer
from serving.failsafe import PrevRates, Proposal, UpdateRules, decide_update
from serving.feed import FeedDomain, FeedRecord, from_units, sign_record
from serving.markets import load_markets
from serving.publish import publish_market
from serving.store import FeedStore

RULES = UpdateRules(floor=0.02, ceiling=0.5, max_change=0.25, notice_s=3600, min_interval_s=60, mm_fraction=0.5,
                    static_im=0.10)


@pytest.fixture(scope="module")
def compiled():
    return compile_consumer()


@pytest.fixture
def chain(compiled):
    return ConsumerChain.deploy(ADDRESS, max_change=RULES.max_change_units, notice_s=RULES.notice_s,
                                min_interval_s=RULES.min_interval_s, compiled=compiled)


def chain_now(chain) -> int:
    return int(chain.tester.get_block_by_number("latest")["timestamp"]) + 5


def record(chain, d, update_id, t, market="BTC-PERP", valid_for=7200, key=KEY_HEX):
    t0 = datetime.fromtimestamp(t, UTC)
    kw = {}
    if d.mm_pending:
        kw = {"mm_rate_pending": from_units(d.mm_pending),
              "mm_effective_from": datetime.fromtimestamp(d.mm_effective_from, UTC)}
    p = MarginParams(market_id="BTC", im_rate=from_units(d.im), mm_rate=from_units(d.mm), valid_from=t0,
                     valid_until=t0 + timedelta(seconds=valid_for), **kw)
    rec = FeedRecord(market=market, update_id=update_id, params=p, forecast={}, previous=None, fallback=d.fallback,
                     fallback_reason=d.reason, lineage={"test": True})
    return sign_record(rec, FeedDomain(chain_id=chain.chain_id, verifying_contract=chain.address), key)


def submit_at(chain, doc, t):
    chain.set_time(t)
    return chain.submit(doc["message"], doc["signature"])


def test_digest_and_recovery_match_python(chain):
    t = chain_now(chain)
    d = decide_update(Proposal(im=0.1), RULES, t)
    doc = record(chain, d, 1, t)
    from eth_account.messages import _hash_eip191_message

    from serving.feed import _signable

    assert chain.digest(doc["message"]) == "0x" + _hash_eip191_message(_signable(doc["message"], FeedDomain.from_dict(
        doc["domain"]))).hex()
    assert chain.recover(doc["message"], doc["signature"]) == ADDRESS


def test_controlled_sequence_is_accepted_and_rates_bind_after_notice(chain):
    rng = random.Random(7)
    t = chain_now(chain)
    prev = good = None
    uid = 0
    for step in range(10):
        t += rng.choice([60, 600, 1800, 4000])
        prop = Proposal(im=math.nan) if step == 6 else Proposal(im=rng.uniform(0.01, 0.4))
        d = decide_update(prop, RULES, t, prev, good)
        assert not d.skip
        uid += 1
        doc = record(chain, d, uid, t)
        assert submit_at(chain, doc, t) is None, (step, doc["message"])
        prev = PrevRates.from_message(doc["message"])
        good = prev if not d.fallback else good
    cur = chain.current("BTC-PERP")
    assert cur["updateId"] == uid and cur["paramsHash"] == doc["message"]["paramsHash"]
    if cur["mmRatePending"]:
        assert chain.mm_rate_at("BTC-PERP", cur["mmEffectiveFrom"] - 1) == cur["mmRate"]
        assert chain.mm_rate_at("BTC-PERP", cur["mmEffectiveFrom"]) == cur["mmRatePending"]


def test_rejections(chain):
    t = chain_now(chain)
    first = decide_update(Proposal(im=0.1), RULES, t)
    doc = record(chain, first, 1, t)
    assert submit_at(chain, doc, t) is None
    # replay of the same record
    assert chain.submit(doc["message"], doc["signature"]) == "Replay"
    t2 = t + 120
    ok = decide_update(Proposal(im=0.11), RULES, t2, PrevRates.from_message(doc["message"]))
    good2 = record(chain, ok, 2, t2)
    # a tampered field: the signature no longer recovers to the signer
    bad = copy.deepcopy(good2["message"])
    bad["imRate"] += 1
    chain.set_time(t2)
    assert chain.submit(bad, good2["signature"]) == "BadSignature"
    # signed by another key
    other = record(chain, ok, 2, t2, key=Account.create().key)
    assert chain.submit(other["message"], other["signature"]) == "BadSignature"
    # IM jump beyond the cap, correctly signed (not a fallback)
    jump = copy.copy(ok)
    object.__setattr__(jump, "im", 20_000_000)
    object.__setattr__(jump, "mm", 5_000_000)
    object.__setattr__(jump, "mm_pending", 0)
    object.__setattr__(jump, "mm_effective_from", 0)
    j = record(chain, jump, 2, t2)
    assert chain.submit(j["message"], j["signature"]) == "ImChangeCap"
    # MM raised at once (no notice)
    mmj = copy.copy(jump)
    object.__setattr__(mmj, "im", 11_000_000)
    object.__setattr__(mmj, "mm", 5_500_000)
    m = record(chain, mmj, 2, t2)
    assert chain.submit(m["message"], m["signature"]) == "MmWithoutNotice"
    # too soon after the previous (min interval 60 s)
    soon = record(chain, ok, 2, t + 10)
    assert chain.submit(soon["message"], soon["signature"]) == "TooSoon"
    # and the good one is accepted
    assert chain.submit(good2["message"], good2["signature"]) is None
    # stale: the chain's clock is past validUntil
    t3 = t2 + 120
    d3 = decide_update(Proposal(im=0.11), RULES, t3, PrevRates.from_message(good2["message"]))
    assert submit_at(chain, record(chain, d3, 3, t3), t3 + 7200) == "Stale"
    assert chain.current("BTC-PERP")["updateId"] == 2


def test_published_records_are_accepted_on_chain(chain, tmp_path, cache_dir):
    doc = markets_doc(tmp_path, cache_dir)
    doc["feed"].update(chain_id=chain.chain_id, verifying_contract=chain.address)
    for m in doc["markets"].values():
        m["controls"].update(min_interval="1m")
    cfg = load_markets(doc)
    store = FeedStore(tmp_path / "feed.db")
    t = chain_now(chain)
    key = bytes.fromhex(KEY_HEX)
    for i, as_of in enumerate(["2020-03-05", "2020-03-12", "2020-03-13"]):
        now = datetime.fromtimestamp(t + 120 * i, UTC)
        res = publish_market(cfg, "ETH-PERP", store, key, as_of=datetime.fromisoformat(as_of).replace(tzinfo=UTC),
                             now=now)
        assert res.record is not None and not res.record["fallback"]
        assert submit_at(chain, res.record, int(now.timestamp())) is None
    assert chain.current("ETH-PERP")["updateId"] == 3
