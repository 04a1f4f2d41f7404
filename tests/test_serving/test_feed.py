"""Feed records and EIP-712 signing: the fixed test vector, an independent digest, tampering, expiry, replay."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from eth_abi import encode
from eth_utils import keccak
from hypothesis import given
from hypothesis import strategies as st

from serving.feed import (
    EXPO,
    FeedDomain,
    FeedRecord,
    VerificationError,
    canonical_json,
    from_units,
    recover_signer,
    sign_record,
    to_units,
    verify_record,
)

VECTOR = json.loads((Path(__file__).parent / "data" / "feed_vector.json").read_text())
# the signature of the vector, fixed here (also in docs/serving.md): RFC 6979 signing is deterministic
VECTOR_SIGNATURE = (
    "0x9723528ecb63ec7e13724a263087378161ce6203918d99de083990e929eb48ce"
    "501ea00f9b2f90627afce5d8b42db80a85a606b6055d8da2417be0cf9d664e801b"
)
VECTOR_DIGEST = "0xd697062938038cef79300496fb88b93e1d0431b6fe1e896cd91d1d577385dd64"


def manual_digest(msg: dict, domain: dict) -> bytes:
    """EIP-712 digest written out from the spec with eth_abi + keccak (independent of eth-account)."""
    dom_t = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
    dom = keccak(encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                        [dom_t, keccak(text=domain["name"]), keccak(text=domain["version"]), domain["chainId"],
                         domain["verifyingContract"]]))
    rec_t = keccak(text="MarginFeedRecord(string market,uint256 imRate,uint256 mmRate,uint256 mmRatePending,int8 expo,"
                        "uint64 mmEffectiveFrom,uint64 validFrom,uint64 validUntil,uint64 updateId,bool fallback,"
                        "bytes32 paramsHash,bytes32 lineageHash)")
    sh = keccak(encode(
        ["bytes32", "bytes32", "uint256", "uint256", "uint256", "int8", "uint64", "uint64", "uint64", "uint64", "bool",
         "bytes32", "bytes32"],
        [rec_t, keccak(text=msg["market"]), msg["imRate"], msg["mmRate"], msg["mmRatePending"], msg["expo"],
         msg["mmEffectiveFrom"], msg["validFrom"], msg["validUntil"], msg["updateId"], msg["fallback"],
         bytes.fromhex(msg["paramsHash"][2:]), bytes.fromhex(msg["lineageHash"][2:])]))
    return keccak(b"\x19\x01" + dom + sh)


class TestVector:
    def test_signature_matches_the_fixed_vector(self):
        doc = VECTOR["record"]
        rec = FeedRecord.from_dict(doc)
        signed = sign_record(rec, FeedDomain.from_dict(doc["domain"]), VECTOR["private_key"])
        assert signed["signature"] == VECTOR_SIGNATURE == doc["signature"]
        assert signed["message"] == doc["message"]
        assert signed["signer"] == VECTOR["address"] == "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"

    def test_digest_equals_independent_encoding(self):
        doc = VECTOR["record"]
        assert "0x" + manual_digest(doc["message"], doc["domain"]).hex() == VECTOR_DIGEST == VECTOR["digest"]

    def test_recovers_to_signer(self):
        doc = VECTOR["record"]
        assert recover_signer(doc["message"], FeedDomain.from_dict(doc["domain"]), doc["signature"]) == VECTOR["address"]
        assert verify_record(doc).update_id == 7

    def test_message_hashes_are_keccak_of_canonical_json(self):
        doc = VECTOR["record"]
        assert doc["message"]["paramsHash"] == "0x" + keccak(canonical_json(doc["params"]).encode()).hex()
        assert doc["message"]["lineageHash"] == "0x" + keccak(canonical_json(doc["lineage"]).encode()).hex()
        assert doc["message"]["imRate"] == 10_000_000 and doc["message"]["expo"] == EXPO == -8
        assert doc["message"]["mmRatePending"] == 6_000_000
        assert doc["message"]["mmEffectiveFrom"] == int(datetime(2024, 1, 1, 1, tzinfo=UTC).timestamp())


class TestTampering:
    @pytest.mark.parametrize("field,value", [
        ("imRate", 10_000_001), ("mmRate", 1), ("mmRatePending", 0), ("expo", -6), ("mmEffectiveFrom", 1),
        ("validFrom", 1), ("validUntil", 2**40), ("updateId", 8), ("fallback", True), ("market", "ETH-PERP"),
        ("paramsHash", "0x" + "00" * 32), ("lineageHash", "0x" + "00" * 32),
    ])
    def test_tampered_message_field_fails(self, field, value):
        doc = copy.deepcopy(VECTOR["record"])
        doc["message"][field] = value
        with pytest.raises(VerificationError, match=rf"message\.{field}|record is for|tampered"):
            verify_record(doc)

    def test_tampered_content_and_message_together_fail_the_signature(self):
        doc = copy.deepcopy(VECTOR["record"])
        doc["params"]["im_rate"] = 0.2
        doc["message"]["imRate"] = 20_000_000
        doc["message"]["paramsHash"] = "0x" + keccak(canonical_json(doc["params"]).encode()).hex()
        with pytest.raises(VerificationError, match="signature recovers to 0x"):
            verify_record(doc)

    def test_tampered_lineage_fails(self):
        doc = copy.deepcopy(VECTOR["record"])
        doc["lineage"]["model_version"] = "4"
        with pytest.raises(VerificationError, match="lineageHash"):
            verify_record(doc)

    def test_wrong_signer_domain_expiry_replay(self):
        doc = VECTOR["record"]
        with pytest.raises(VerificationError, match="not the expected signer"):
            verify_record(doc, signer="0x" + "22" * 20)
        with pytest.raises(VerificationError, match="domain"):
            verify_record(doc, domain=FeedDomain(chain_id=5, verifying_contract="0x" + "11" * 20))
        with pytest.raises(VerificationError, match="expired at 2024-01-02T00:00:00Z"):
            verify_record(doc, now=datetime(2024, 1, 2, tzinfo=UTC))
        assert verify_record(doc, now=datetime(2024, 1, 1, 23, tzinfo=UTC)).update_id == 7
        with pytest.raises(VerificationError, match="replay"):
            verify_record(doc, last_update_id=7)

    def test_malformed_signature_and_missing_fields(self):
        doc = copy.deepcopy(VECTOR["record"])
        doc["signature"] = "0x1234"
        with pytest.raises(VerificationError, match="malformed"):
            verify_record(doc)
        del doc["signature"]
        with pytest.raises(VerificationError, match="missing field 'signature'"):
            verify_record(doc)


class TestEncoding:
    @given(st.integers(min_value=0, max_value=10**8))
    def test_units_round_trip(self, k):
        assert to_units(from_units(k)) == k

    def test_units_reject_bad_values(self):
        for bad in (float("nan"), float("inf"), -0.1, True, "0.1"):
            with pytest.raises(ValueError, match="im_rate must be a finite number >= 0"):
                to_units(bad, "im_rate")

    def test_canonical_json_is_sorted_compact_and_rejects_nan(self):
        assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'
        with pytest.raises(ValueError, match=r"\$\.x\[1\]: must be a finite number, got nan"):
            canonical_json({"x": [1.0, float("nan")]})

    def test_domain_and_record_validation(self):
        with pytest.raises(ValueError, match="feed.chain_id must be a positive integer, got 0"):
            FeedDomain(chain_id=0, verifying_contract="0x" + "11" * 20)
        with pytest.raises(ValueError, match="feed.verifying_contract must be a 20-byte hex address, got 'abc'"):
            FeedDomain(chain_id=1, verifying_contract="abc")
        rec = FeedRecord.from_dict(VECTOR["record"])
        with pytest.raises(ValueError, match="update_id must be an integer in"):
            FeedRecord(**{**rec.__dict__, "update_id": 0})
        with pytest.raises(ValueError, match="fallback record needs fallback_reason"):
            FeedRecord(**{**rec.__dict__, "fallback": True, "fallback_reason": None})


def test_vector_matches_the_feed_record_schema():
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    root = Path(__file__).resolve().parents[2] / "schemas"
    schemas = {p.name: json.loads(p.read_text()) for p in root.glob("*.schema.json")}
    reg = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    v = Draft202012Validator(schemas["feed_record.schema.json"], registry=reg)
    assert list(v.iter_errors(VECTOR["record"])) == []
    bad = copy.deepcopy(VECTOR["record"])
    bad["message"]["expo"] = -6
    assert list(v.iter_errors(bad))
