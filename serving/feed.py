"""Feed records: a whole :class:`margin.params.MarginParams` wrapped with its forecast, update id, previous
values, fallback flag and lineage, signed as EIP-712 typed data.

The signed message is the fixed-size summary a contract can check cheaply; the full parameters and the lineage
enter it through two hashes:

* ``paramsHash`` = ``keccak256`` of the canonical JSON of ``MarginParams.to_dict()``;
* ``lineageHash`` = ``keccak256`` of the canonical JSON of the lineage mapping.

Canonical JSON: keys sorted, no whitespace (``separators=(",", ":")``), UTF-8, no NaN/infinity, floats in
Python's shortest round-trip form. Rates in the message are integers with an exponent, as price feeds publish
them: ``value = integer × 10**expo`` with ``expo = -8`` (:data:`EXPO`).

EIP-712 domain: ``name="volmargin"``, ``version="1"``, ``chainId`` and ``verifyingContract`` from the feed
configuration. Primary type (field order is part of the contract, see :data:`RECORD_TYPE`)::

    MarginFeedRecord(string market,uint256 imRate,uint256 mmRate,uint256 mmRatePending,int8 expo,
                     uint64 mmEffectiveFrom,uint64 validFrom,uint64 validUntil,uint64 updateId,bool fallback,
                     bytes32 paramsHash,bytes32 lineageHash)

``mmRatePending`` and ``mmEffectiveFrom`` are 0 when no MM increase is pending; times are UNIX seconds (UTC).
For tiered parameters ``imRate``/``mmRate`` are the first (smallest-notional) tier's rates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from eth_utils import keccak, to_checksum_address

from margin.params import MarginParams

__all__ = [
    "EXPO",
    "SCALE",
    "RECORD_SCHEMA",
    "RECORD_TYPE",
    "DOMAIN_TYPE",
    "FeedDomain",
    "FeedRecord",
    "canonical_json",
    "keccak_hex",
    "params_hash",
    "lineage_hash",
    "to_units",
    "from_units",
    "typed_data",
    "sign_record",
    "recover_signer",
    "verify_record",
    "VerificationError",
]

#: Exponent of the integer rates in the signed message (value = integer × 10**EXPO).
EXPO = -8
#: ``10 ** -EXPO``: integer units per 1.0.
SCALE = 10 ** (-EXPO)
#: Identifier of the record document layout (schemas/feed_record.schema.json).
RECORD_SCHEMA = "volmargin.feed_record/1"

DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
#: The EIP-712 primary type ``MarginFeedRecord`` (names, types and order are a contract with consumers).
RECORD_TYPE = [
    {"name": "market", "type": "string"},
    {"name": "imRate", "type": "uint256"},
    {"name": "mmRate", "type": "uint256"},
    {"name": "mmRatePending", "type": "uint256"},
    {"name": "expo", "type": "int8"},
    {"name": "mmEffectiveFrom", "type": "uint64"},
    {"name": "validFrom", "type": "uint64"},
    {"name": "validUntil", "type": "uint64"},
    {"name": "updateId", "type": "uint64"},
    {"name": "fallback", "type": "bool"},
    {"name": "paramsHash", "type": "bytes32"},
    {"name": "lineageHash", "type": "bytes32"},
]
_UINT64_MAX = 2**64 - 1


class VerificationError(ValueError):
    """A record failed verification (signature, signer, hashes, expiry or replay); the message says which."""


# ----------------------------------------------------------------------------------------------- encoding
def canonical_json(obj: Any) -> str:
    """Canonical JSON text of ``obj``: sorted keys, no whitespace, UTF-8, NaN/infinity rejected.

    Raises
    ------
    ValueError
        ``obj`` holds a non-finite float (named by its JSON path).
    """
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"{bad[0]}: must be a finite number, got {bad[1]!r}")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _non_finite(obj: Any, path: str = "$") -> tuple[str, float] | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            hit = _non_finite(v, f"{path}.{k}")
            if hit:
                return hit
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            hit = _non_finite(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def keccak_hex(text: str) -> str:
    """``0x``-prefixed keccak256 of the UTF-8 bytes of ``text``."""
    return "0x" + keccak(text.encode("utf-8")).hex()


def params_hash(params: MarginParams | Mapping[str, Any]) -> str:
    """``paramsHash``: keccak256 of the canonical JSON of the whole ``MarginParams`` (as ``to_dict()``)."""
    d = params.to_dict() if isinstance(params, MarginParams) else dict(params)
    return keccak_hex(canonical_json(d))


def lineage_hash(lineage: Mapping[str, Any]) -> str:
    """``lineageHash``: keccak256 of the canonical JSON of the lineage mapping."""
    return keccak_hex(canonical_json(dict(lineage)))


def to_units(value: float, name: str = "value") -> int:
    """A rate as an integer in units of ``10**EXPO`` (exact decimal rounding, half to even).

    Raises
    ------
    ValueError
        ``value`` is not a finite number >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return int((Decimal(repr(float(value))) * SCALE).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def from_units(units: int) -> float:
    """Inverse of :func:`to_units`: ``units × 10**EXPO`` as a float."""
    return float(Decimal(int(units)) / SCALE)


def _unix(t: datetime | None) -> int:
    if t is None:
        return 0
    return int(t.astimezone(UTC).timestamp())


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _time(name: str, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name} must be an ISO-8601 UTC time, got {value!r}") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware UTC datetime, got {value!r}")
    return value.astimezone(UTC)


# ----------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True, slots=True)
class FeedDomain:
    """The EIP-712 domain of the feed.

    Parameters
    ----------
    chain_id : int
        Chain the consumer contract lives on (``block.chainid``), > 0.
    verifying_contract : str
        Address of the consumer contract (checksummed on construction).
    name, version : str
        Fixed to ``"volmargin"`` and ``"1"`` for this record layout.
    """

    chain_id: int
    verifying_contract: str
    name: str = "volmargin"
    version: str = "1"

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise ValueError(f"feed.chain_id must be a positive integer, got {self.chain_id!r}")
        try:
            addr = to_checksum_address(self.verifying_contract)
        except (ValueError, TypeError):
            raise ValueError(
                f"feed.verifying_contract must be a 20-byte hex address, got {self.verifying_contract!r}"
            ) from None
        object.__setattr__(self, "verifying_contract", addr)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "chainId": self.chain_id,
                "verifyingContract": self.verifying_contract}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeedDomain:
        return cls(chain_id=d["chainId"], verifying_contract=d["verifyingContract"], name=d.get("name", "volmargin"),
                   version=d.get("version", "1"))


@dataclass(frozen=True)
class FeedRecord:
    """One update of one market's margin parameters (unsigned content).

    Parameters
    ----------
    market : str
        Feed market id (``BTC-PERP``); ``params.market_id`` is its underlying (``BTC``).
    update_id : int
        Monotonic update number per market (1, 2, ...).
    params : MarginParams
        The whole parameter set; ``valid_from``/``valid_until`` must be set (UTC, stamped at publishing).
    forecast : dict
        The forecast behind the numbers (model, origin, per-step variance, raw policy output).
    previous : dict or None
        The previous record's rates, times and update id (None for the first record).
    fallback : bool
        Whether these are the failsafe's conservative parameters.
    fallback_reason : str or None
        Why (required when ``fallback``).
    lineage : dict
        Model name/version/alias, data content hash, code version, config hash, as-of time, policy.
    adjustments : list of str
        Controls that changed the policy's raw output (``im change cap``, ``mm notice`` ...).
    """

    market: str
    update_id: int
    params: MarginParams
    forecast: dict[str, Any]
    previous: dict[str, Any] | None
    fallback: bool
    fallback_reason: str | None
    lineage: dict[str, Any]
    adjustments: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.market, str) or not self.market:
            raise ValueError(f"market must be a non-empty string, got {self.market!r}")
        if isinstance(self.update_id, bool) or not isinstance(self.update_id, int) or not 0 < self.update_id <= _UINT64_MAX:
            raise ValueError(f"update_id must be an integer in [1, 2**64), got {self.update_id!r}")
        if not isinstance(self.params, MarginParams):
            raise ValueError(f"params must be a MarginParams, got {type(self.params).__name__}")
        if self.params.valid_from is None or self.params.valid_until is None:
            raise ValueError(f"{self.market}: params.valid_from and params.valid_until must be set for a feed record")
        if self.fallback and not self.fallback_reason:
            raise ValueError(f"{self.market}: a fallback record needs fallback_reason, got {self.fallback_reason!r}")
        canonical_json(self.forecast)  # finite numbers only (raises naming the field)
        canonical_json(self.lineage)
        object.__setattr__(self, "adjustments", tuple(self.adjustments))

    # ------------------------------------------------------------------ message
    @property
    def im_rate(self) -> float:
        return self.params.tiers[0].im_rate

    @property
    def mm_rate(self) -> float:
        return self.params.tiers[0].mm_rate

    def message(self) -> dict[str, Any]:
        """The EIP-712 ``MarginFeedRecord`` message (integers; hashes as ``0x`` hex)."""
        p = self.params
        return {
            "market": self.market,
            "imRate": to_units(self.im_rate, "im_rate"),
            "mmRate": to_units(self.mm_rate, "mm_rate"),
            "mmRatePending": 0 if p.mm_rate_pending is None else to_units(p.mm_rate_pending, "mm_rate_pending"),
            "expo": EXPO,
            "mmEffectiveFrom": _unix(p.mm_effective_from),
            "validFrom": _unix(p.valid_from),
            "validUntil": _unix(p.valid_until),
            "updateId": self.update_id,
            "fallback": bool(self.fallback),
            "paramsHash": params_hash(p),
            "lineageHash": lineage_hash(self.lineage),
        }

    def to_dict(self, domain: FeedDomain, signer: str | None = None, signature: str | None = None) -> dict[str, Any]:
        """The record document (schemas/feed_record.schema.json), signed when ``signature`` is given."""
        out: dict[str, Any] = {
            "schema": RECORD_SCHEMA,
            "market": self.market,
            "update_id": self.update_id,
            "valid_from": _iso(self.params.valid_from),
            "valid_until": _iso(self.params.valid_until),
            "fallback": bool(self.fallback),
            "fallback_reason": self.fallback_reason,
            "params": self.params.to_dict(),
            "forecast": self.forecast,
            "previous": self.previous,
            "lineage": self.lineage,
            "adjustments": list(self.adjustments),
            "message": self.message(),
            "domain": domain.to_dict(),
        }
        if signature is not None:
            out["signer"] = signer
            out["signature"] = signature
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeedRecord:
        """Rebuild the content of a record document (the message and signature are not trusted here)."""
        for key in ("market", "update_id", "params", "forecast", "fallback", "lineage"):
            if key not in d:
                raise ValueError(f"record: missing field {key!r}")
        try:
            params = MarginParams.from_dict(d["params"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"record.params: {exc}") from None
        return cls(market=d["market"], update_id=d["update_id"], params=params, forecast=dict(d["forecast"]),
                   previous=d.get("previous"), fallback=bool(d["fallback"]), fallback_reason=d.get("fallback_reason"),
                   lineage=dict(d["lineage"]), adjustments=tuple(d.get("adjustments", ())))


# ----------------------------------------------------------------------------------------------- signing
def typed_data(message: Mapping[str, Any], domain: FeedDomain) -> dict[str, Any]:
    """The full EIP-712 typed-data document of a message (as ``eth_signTypedData_v4`` takes it)."""
    return {
        "types": {"EIP712Domain": DOMAIN_TYPE, "MarginFeedRecord": RECORD_TYPE},
        "primaryType": "MarginFeedRecord",
        "domain": domain.to_dict(),
        "message": dict(message),
    }


def _signable(message: Mapping[str, Any], domain: FeedDomain) -> Any:
    from eth_account.messages import encode_typed_data

    msg = dict(message)
    for k in ("paramsHash", "lineageHash"):
        v = msg[k]
        msg[k] = bytes.fromhex(v[2:]) if isinstance(v, str) else bytes(v)
    return encode_typed_data(full_message=typed_data(msg, domain))


def sign_record(record: FeedRecord, domain: FeedDomain, private_key: bytes | str) -> dict[str, Any]:
    """Sign ``record`` and return its signed document (``signer`` = the key's address).

    The key is used only here and never logged or stored in the document.
    """
    from eth_account import Account

    acct = Account.from_key(private_key)
    signed = acct.sign_message(_signable(record.message(), domain))
    return record.to_dict(domain, signer=acct.address, signature="0x" + bytes(signed.signature).hex())


def recover_signer(message: Mapping[str, Any], domain: FeedDomain, signature: str) -> str:
    """Address that signed ``message`` under ``domain`` (checksummed)."""
    from eth_account import Account

    try:
        return Account.recover_message(_signable(message, domain), signature=signature)
    except Exception as exc:  # noqa: BLE001 - eth-account raises several types for a malformed signature
        raise VerificationError(f"signature {str(signature)[:20]}... is malformed: {exc}") from None


def verify_record(
    doc: Mapping[str, Any],
    *,
    signer: str | None = None,
    domain: FeedDomain | None = None,
    now: datetime | None = None,
    last_update_id: int | None = None,
) -> FeedRecord:
    """Verify a signed record document and return its content.

    Checks, in order: the document rebuilds (its parameters validate); the message it carries equals the
    message recomputed from its content (rates, times, update id, fallback flag, ``paramsHash``,
    ``lineageHash``); the signature recovers to ``signer`` (default: the address the document names); the
    domain (when given) matches; the record has not expired at ``now`` (when given); its update id is above
    ``last_update_id`` (when given: replay protection).

    Raises
    ------
    VerificationError
        Naming the first check that failed and the values involved.
    """
    for key in ("message", "domain", "signature"):
        if key not in doc:
            raise VerificationError(f"record: missing field {key!r} (not a signed feed record)")
    try:
        rec = FeedRecord.from_dict(doc)
        dom = FeedDomain.from_dict(doc["domain"])
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(f"record content is invalid: {exc}") from None
    if domain is not None and dom != domain:
        raise VerificationError(f"record domain {dom.to_dict()} does not match the expected {domain.to_dict()}")
    expected = rec.message()
    carried = dict(doc["message"])
    for k, v in expected.items():
        if carried.get(k) != v:
            raise VerificationError(f"message.{k} is {carried.get(k)!r} but the record's content gives {v!r} (tampered)")
    extra = set(carried) - set(expected)
    if extra:
        raise VerificationError(f"message has unknown field(s) {sorted(extra)}")
    got = recover_signer(expected, dom, str(doc["signature"]))
    want = signer if signer is not None else doc.get("signer")
    if want is None:
        raise VerificationError("no signer to check against: pass signer= or include 'signer' in the record")
    try:
        want_cs = to_checksum_address(want)
    except (ValueError, TypeError):
        raise VerificationError(f"signer must be a 20-byte hex address, got {want!r}") from None
    if got != want_cs:
        raise VerificationError(f"signature recovers to {got}, not the expected signer {want_cs}")
    if now is not None:
        t = _time("now", now)
        assert rec.params.valid_until is not None
        if t >= rec.params.valid_until:
            raise VerificationError(
                f"record {rec.market}#{rec.update_id} expired at {_iso(rec.params.valid_until)} (now {_iso(t)})"
            )
    if last_update_id is not None and rec.update_id <= last_update_id:
        raise VerificationError(
            f"update_id {rec.update_id} of {rec.market} is not above the last accepted {last_update_id} (replay)"
        )
    return rec
