// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title MarginFeedConsumer
/// @notice On-chain consumer of the volmargin margin feed. Accepts a record only when its EIP-712 signature
/// recovers to the trusted signer, it is valid now (not stale, not from the future), its update id is above the
/// last accepted one (no replay), and it respects the change caps against the last accepted record:
///   - IM moves by at most maxChange (1e-8 units) per update; a fallback record may raise IM at once;
///   - the binding MM never rises within one update: an increase is announced as mmRatePending and binds from
///     mmEffectiveFrom, at least noticeSeconds after the record's validFrom (a lowered pending level keeps its
///     date); decreases are capped like IM (or follow IM down);
///   - normal (non-fallback) records come at least minInterval seconds apart.
/// The rules are the same as serving/failsafe.py (check_update), checked in integers (expo = -8).
contract MarginFeedConsumer {
    struct MarginFeedRecord {
        string market;
        uint256 imRate;
        uint256 mmRate;
        uint256 mmRatePending;
        int8 expo;
        uint64 mmEffectiveFrom;
        uint64 validFrom;
        uint64 validUntil;
        uint64 updateId;
        bool isFallback; // EIP-712 field `fallback` (a reserved word in Solidity; the type string names it)
        bytes32 paramsHash;
        bytes32 lineageHash;
    }

    struct Current {
        uint256 imRate;
        uint256 mmRate;
        uint256 mmRatePending;
        uint64 mmEffectiveFrom;
        uint64 validFrom;
        uint64 validUntil;
        uint64 updateId;
        bool isFallback;
        bytes32 paramsHash;
    }

    bytes32 public constant RECORD_TYPEHASH = keccak256(
        "MarginFeedRecord(string market,uint256 imRate,uint256 mmRate,uint256 mmRatePending,int8 expo,"
        "uint64 mmEffectiveFrom,uint64 validFrom,uint64 validUntil,uint64 updateId,bool fallback,"
        "bytes32 paramsHash,bytes32 lineageHash)"
    );
    bytes32 public constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    uint256 public constant SCALE = 1e8;
    int8 public constant EXPO = -8;
    // secp256k1n / 2: signatures with a larger s are malleable copies
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    address public immutable signer;
    uint256 public immutable maxChange;
    uint64 public immutable noticeSeconds;
    uint64 public immutable minInterval;

    mapping(bytes32 => Current) private _current;

    event RecordAccepted(string market, uint64 updateId, uint256 imRate, uint256 mmRate, bool isFallback);

    error BadSignature(address recovered);
    error Stale(uint64 validFrom, uint64 validUntil, uint256 nowTs);
    error Replay(uint64 updateId, uint64 lastUpdateId);
    error BadExpo(int8 expo);
    error BadRates(uint256 imRate, uint256 mmRate, uint256 mmRatePending);
    error TooSoon(uint64 validFrom, uint64 earliest);
    error ImChangeCap(uint256 imRate, uint256 previous);
    error MmChangeCap(uint256 mmRate, uint256 binding);
    error MmWithoutNotice(uint256 mmRate, uint256 binding);
    error NoticeTooShort(uint64 mmEffectiveFrom, uint64 earliest);
    error NoMarket(string market);

    constructor(address signer_, uint256 maxChange_, uint64 noticeSeconds_, uint64 minInterval_) {
        require(signer_ != address(0), "signer is zero");
        require(maxChange_ > 0 && maxChange_ < SCALE, "maxChange out of (0, 1e8)");
        signer = signer_;
        maxChange = maxChange_;
        noticeSeconds = noticeSeconds_;
        minInterval = minInterval_;
    }

    function domainSeparator() public view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("volmargin"), keccak256("1"), block.chainid, address(this))
        );
    }

    function structHash(MarginFeedRecord calldata r) public pure returns (bytes32) {
        bytes memory a = abi.encode(
            RECORD_TYPEHASH, keccak256(bytes(r.market)), r.imRate, r.mmRate, r.mmRatePending, r.expo, r.mmEffectiveFrom
        );
        bytes memory b = abi.encode(r.validFrom, r.validUntil, r.updateId, r.isFallback, r.paramsHash, r.lineageHash);
        return keccak256(bytes.concat(a, b));
    }

    /// @notice The EIP-712 digest a record's signature signs.
    function digest(MarginFeedRecord calldata r) public view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash(r)));
    }

    function recover(MarginFeedRecord calldata r, bytes calldata sig) public view returns (address) {
        if (sig.length != 65) return address(0);
        bytes32 rr = bytes32(sig[0:32]);
        bytes32 ss = bytes32(sig[32:64]);
        uint8 v = uint8(sig[64]);
        if (v < 27) v += 27;
        if (uint256(ss) > HALF_N || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest(r), v, rr, ss);
    }

    /// @notice Verify and store a record; reverts naming the rule it breaks.
    function submit(MarginFeedRecord calldata r, bytes calldata sig) external {
        address got = recover(r, sig);
        if (got == address(0) || got != signer) revert BadSignature(got);
        if (r.expo != EXPO) revert BadExpo(r.expo);
        if (block.timestamp < r.validFrom || block.timestamp >= r.validUntil) {
            revert Stale(r.validFrom, r.validUntil, block.timestamp);
        }
        if (r.mmRate == 0 || r.mmRate > r.imRate || r.imRate > SCALE) revert BadRates(r.imRate, r.mmRate, r.mmRatePending);
        if (r.mmRatePending != 0 && (r.mmRatePending <= r.mmRate || r.mmRatePending > r.imRate)) {
            revert BadRates(r.imRate, r.mmRate, r.mmRatePending);
        }
        if ((r.mmRatePending == 0) != (r.mmEffectiveFrom == 0)) revert BadRates(r.imRate, r.mmRate, r.mmRatePending);
        bytes32 key = keccak256(bytes(r.market));
        Current storage p = _current[key];
        if (p.updateId != 0) {
            _checkAgainst(r, p);
        }
        _current[key] = Current(
            r.imRate, r.mmRate, r.mmRatePending, r.mmEffectiveFrom, r.validFrom, r.validUntil, r.updateId, r.isFallback,
            r.paramsHash
        );
        emit RecordAccepted(r.market, r.updateId, r.imRate, r.mmRate, r.isFallback);
    }

    function _checkAgainst(MarginFeedRecord calldata r, Current storage p) private view {
        if (r.updateId <= p.updateId) revert Replay(r.updateId, p.updateId);
        uint64 earliest = p.validFrom + (r.isFallback ? 0 : minInterval);
        if (r.validFrom < earliest) revert TooSoon(r.validFrom, earliest);
        // IM: decreases always capped, increases capped unless fallback
        if (r.imRate * SCALE < p.imRate * (SCALE - maxChange)) revert ImChangeCap(r.imRate, p.imRate);
        if (!r.isFallback && r.imRate * SCALE > p.imRate * (SCALE + maxChange)) revert ImChangeCap(r.imRate, p.imRate);
        uint256 binding = (p.mmRatePending != 0 && p.mmEffectiveFrom <= r.validFrom) ? p.mmRatePending : p.mmRate;
        if (r.mmRate > binding) {
            if (noticeSeconds > 0) revert MmWithoutNotice(r.mmRate, binding);
            if (!r.isFallback && r.mmRate * SCALE > binding * (SCALE + maxChange)) revert MmChangeCap(r.mmRate, binding);
        }
        if (r.mmRate < binding && r.mmRate != r.imRate && r.mmRate * SCALE < binding * (SCALE - maxChange)) {
            revert MmChangeCap(r.mmRate, binding);
        }
        if (r.mmRatePending != 0) {
            bool carried = p.mmRatePending != 0 && r.mmEffectiveFrom == p.mmEffectiveFrom
                && p.mmEffectiveFrom > r.validFrom && r.mmRatePending <= p.mmRatePending;
            if (!carried && r.mmEffectiveFrom < r.validFrom + noticeSeconds) {
                revert NoticeTooShort(r.mmEffectiveFrom, r.validFrom + noticeSeconds);
            }
            if (!r.isFallback && r.mmRatePending * SCALE > binding * (SCALE + maxChange)) {
                revert MmChangeCap(r.mmRatePending, binding);
            }
        }
    }

    /// @notice The last accepted record of a market (reverts when none).
    function current(string calldata market) external view returns (Current memory) {
        Current memory c = _current[keccak256(bytes(market))];
        if (c.updateId == 0) revert NoMarket(market);
        return c;
    }

    /// @notice Maintenance margin rate binding on open positions at time t (1e-8 units); reverts when the
    /// last record has expired at t, so a stale rate is never used.
    function mmRateAt(string calldata market, uint64 t) external view returns (uint256) {
        Current memory c = _current[keccak256(bytes(market))];
        if (c.updateId == 0) revert NoMarket(market);
        if (t >= c.validUntil) revert Stale(c.validFrom, c.validUntil, t);
        return (c.mmRatePending != 0 && c.mmEffectiveFrom <= t) ? c.mmRatePending : c.mmRate;
    }
}
