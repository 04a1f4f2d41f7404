"""The on-chain consumer: compile ``serving/contracts/MarginFeedConsumer.sol`` with the npm ``solc`` package
(solc-js, run by node), deploy it on an in-process EVM (eth-tester with py-evm) and submit signed records.

solc-js is found in ``$VOLMARGIN_SOLC_DIR`` (a folder holding ``node_modules/solc``) or the repository's
``.npm`` folder (``make install`` runs ``npm install --prefix .npm solc@0.8.26``). The compiled ABI and bytecode
are cached next to the source hash, so only the first compile pays solc-js's start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipelines.atomic import atomic_write_text

__all__ = ["CONTRACT_PATH", "SolcNotFound", "find_solc", "compile_consumer", "ConsumerChain", "record_tuple",
           "RECORD_ABI_TYPE"]

CONTRACT_PATH = Path(__file__).with_name("contracts") / "MarginFeedConsumer.sol"
_REPO = Path(__file__).resolve().parents[1]
#: ABI type of the ``MarginFeedRecord`` struct (the EIP-712 field order).
RECORD_ABI_TYPE = "(string,uint256,uint256,uint256,int8,uint64,uint64,uint64,uint64,bool,bytes32,bytes32)"

_NODE_COMPILE = r"""
const solc = require(process.argv[1]);
let src = '';
process.stdin.on('data', d => src += d);
process.stdin.on('end', () => { process.stdout.write(solc.compile(src)); });
"""


class SolcNotFound(RuntimeError):
    """node or the npm ``solc`` package is missing (the message says how to install it)."""


def find_solc() -> tuple[str, Path]:
    """``(node executable, solc package folder)``.

    Raises
    ------
    SolcNotFound
    """
    node = shutil.which("node")
    if node is None:
        raise SolcNotFound("node is not installed (apt-get install nodejs); it runs the npm solc package")
    cands = [Path(os.environ["VOLMARGIN_SOLC_DIR"])] if os.environ.get("VOLMARGIN_SOLC_DIR") else []
    cands.append(_REPO / ".npm")
    for c in cands:
        pkg = c / "node_modules" / "solc"
        if (pkg / "package.json").is_file():
            return node, pkg
    raise SolcNotFound(f"npm package solc not found in {', '.join(str(c) for c in cands)}; "
                       "run `npm install --prefix .npm solc@0.8.26` (make install does)")


def compile_consumer(source: Path = CONTRACT_PATH, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Compile the consumer contract; returns ``{"abi": [...], "bytecode": "0x...", "solc": version}``.

    Raises
    ------
    SolcNotFound
        No node / solc-js.
    RuntimeError
        The compiler reported an error (its messages are included).
    """
    text = Path(source).read_text(encoding="utf-8")
    node, pkg = find_solc()
    version = json.loads((pkg / "package.json").read_text())["version"]
    key = hashlib.sha256(f"{version}\n{text}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else _REPO / "artifacts" / "serving" / "solc"
    hit = cache / f"MarginFeedConsumer-{key}.json"
    if hit.is_file():
        return json.loads(hit.read_text())
    name = Path(source).name
    std = {
        "language": "Solidity",
        "sources": {name: {"content": text}},
        "settings": {"optimizer": {"enabled": True, "runs": 200}, "evmVersion": "paris",
                     "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}}},
    }
    proc = subprocess.run([node, "-e", _NODE_COMPILE, str(pkg)], input=json.dumps(std), capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"solc-js failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise RuntimeError("solc errors: " + "; ".join(e.get("formattedMessage", e.get("message", "")) for e in errors))
    c = out["contracts"][name]["MarginFeedConsumer"]
    res = {"abi": c["abi"], "bytecode": "0x" + c["evm"]["bytecode"]["object"], "solc": version}
    atomic_write_text(hit, json.dumps(res))
    return res


def record_tuple(message: Mapping[str, Any]) -> tuple[Any, ...]:
    """A signed record's EIP-712 message as the contract's ``MarginFeedRecord`` tuple."""
    m = message
    return (m["market"], int(m["imRate"]), int(m["mmRate"]), int(m["mmRatePending"]), int(m["expo"]),
            int(m["mmEffectiveFrom"]), int(m["validFrom"]), int(m["validUntil"]), int(m["updateId"]),
            bool(m["fallback"]), bytes.fromhex(str(m["paramsHash"])[2:]), bytes.fromhex(str(m["lineageHash"])[2:]))


def _selector(signature: str) -> bytes:
    from eth_utils import keccak

    return keccak(text=signature)[:4]


@dataclass
class ConsumerChain:
    """A deployed consumer on an in-process EVM (eth-tester + py-evm).

    Use :meth:`deploy`; :meth:`submit` sends a record (returns None, or the revert reason), :meth:`current`
    and :meth:`mm_rate_at` read it back, :meth:`digest` is the contract's EIP-712 digest.
    """

    tester: Any
    address: str
    sender: str
    abi: list[dict[str, Any]]

    @classmethod
    def deploy(cls, signer: str, *, max_change: int, notice_s: int, min_interval_s: int,
               compiled: Mapping[str, Any] | None = None) -> ConsumerChain:
        from eth_abi import encode
        from eth_tester import EthereumTester, PyEVMBackend

        comp = dict(compiled) if compiled is not None else compile_consumer()
        t = EthereumTester(PyEVMBackend())
        sender = t.get_accounts()[0]
        args = encode(["address", "uint256", "uint64", "uint64"], [signer, max_change, notice_s, min_interval_s])
        tx = t.send_transaction({"from": sender, "data": comp["bytecode"] + args.hex(), "gas": 5_000_000,
                                 "value": 0})
        receipt = t.get_transaction_receipt(tx)
        return cls(tester=t, address=receipt["contract_address"], sender=sender, abi=comp["abi"])

    @property
    def chain_id(self) -> int:
        """``block.chainid`` of the in-process chain (the EIP-712 domain's ``chainId``)."""
        return int(self.tester.backend.chain.chain_id)

    def set_time(self, ts: int) -> None:
        """Move the chain's clock to UNIX time ``ts`` (the next block's timestamp)."""
        self.tester.time_travel(int(ts))

    def _call(self, sig: str, types: list[str], values: list[Any], out: list[str]) -> Any:
        from eth_abi import decode, encode

        data = "0x" + (_selector(sig) + encode(types, values)).hex()
        raw = self.tester.call({"from": self.sender, "to": self.address, "data": data})
        raw_b = bytes.fromhex(raw[2:]) if isinstance(raw, str) else bytes(raw)
        return decode(out, raw_b)

    def digest(self, message: Mapping[str, Any]) -> str:
        return "0x" + self._call(f"digest({RECORD_ABI_TYPE})", [RECORD_ABI_TYPE], [record_tuple(message)],
                                 ["bytes32"])[0].hex()

    def recover(self, message: Mapping[str, Any], signature: str) -> str:
        from eth_utils import to_checksum_address

        got = self._call(f"recover({RECORD_ABI_TYPE},bytes)", [RECORD_ABI_TYPE, "bytes"],
                         [record_tuple(message), bytes.fromhex(signature[2:])], ["address"])[0]
        return to_checksum_address(got)

    def submit(self, message: Mapping[str, Any], signature: str) -> str | None:
        """Send ``submit(record, signature)``; None when accepted, else the revert (custom error name)."""
        from eth_abi import encode
        from eth_tester.exceptions import TransactionFailed

        sig = f"submit({RECORD_ABI_TYPE},bytes)"
        data = "0x" + (_selector(sig) + encode([RECORD_ABI_TYPE, "bytes"],
                                                [record_tuple(message), bytes.fromhex(signature[2:])])).hex()
        tx = {"from": self.sender, "to": self.address, "data": data}
        try:  # a call first: eth-tester reports the revert data only for calls
            self.tester.call(tx, "pending")
        except TransactionFailed as exc:
            return self._error_name(exc)
        h = self.tester.send_transaction({**tx, "gas": 1_000_000, "value": 0})
        receipt = self.tester.get_transaction_receipt(h)
        if receipt["status"] != 1:
            return "reverted"
        return None

    def _error_name(self, exc: Exception) -> str:
        import ast

        arg = exc.args[0] if exc.args else ""
        raw: bytes | None = arg if isinstance(arg, bytes) else None
        if raw is None and isinstance(arg, str):
            if arg.startswith(("b'", 'b"')):
                try:
                    raw = ast.literal_eval(arg)
                except (ValueError, SyntaxError):
                    raw = None
            elif arg.startswith("0x"):
                try:
                    raw = bytes.fromhex(arg[2:])
                except ValueError:
                    raw = None
        if raw and len(raw) >= 4:
            for item in self.abi:
                if item.get("type") == "error":
                    sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                    if _selector(sig) == raw[:4]:
                        return item["name"]
        return str(arg)

    def current(self, market: str) -> dict[str, Any]:
        vals = self._call("current(string)", ["string"], [market],
                          ["(uint256,uint256,uint256,uint64,uint64,uint64,uint64,bool,bytes32)"])[0]
        keys = ("imRate", "mmRate", "mmRatePending", "mmEffectiveFrom", "validFrom", "validUntil", "updateId",
                "fallback", "paramsHash")
        out = dict(zip(keys, vals, strict=True))
        out["paramsHash"] = "0x" + out["paramsHash"].hex()
        return out

    def mm_rate_at(self, market: str, t: int) -> int:
        return int(self._call("mmRateAt(string,uint64)", ["string", "uint64"], [market, int(t)], ["uint256"])[0])
