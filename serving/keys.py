"""The feed's signing key: a secp256k1 private key in a file of its own (mode 0600), never in the repository,
never logged. ``VOLMARGIN_SIGNING_KEY_FILE`` names the file for the service and the publisher.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["KEY_ENV", "generate_key", "load_key", "key_path_from_env", "address_of"]

#: Environment variable naming the signing key file.
KEY_ENV = "VOLMARGIN_SIGNING_KEY_FILE"


def generate_key(path: str | Path, *, overwrite: bool = False) -> str:
    """Write a new random signing key to ``path`` (hex, mode 0600, created exclusively) and return its address.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    from eth_account import Account

    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"key file {p} already exists; pass --force to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    acct = Account.create()
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write("0x" + bytes(acct.key).hex() + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(acct.address)


def load_key(path: str | Path) -> bytes:
    """Read a signing key file (32-byte hex). The file must not be readable by group or others.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Wrong permissions or not a 32-byte hex key (the content is never echoed).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"signing key file not found: {p}")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"signing key file {p} has mode {oct(mode)}: it must not be readable by group or others "
                         f"(chmod 600 {p})")
    text = p.read_text(encoding="ascii", errors="replace").strip()
    hexpart = text[2:] if text.lower().startswith("0x") else text
    try:
        key = bytes.fromhex(hexpart)
    except ValueError:
        raise ValueError(f"signing key file {p} does not hold a hex private key") from None
    if len(key) != 32:
        raise ValueError(f"signing key file {p} must hold a 32-byte key, got {len(key)} bytes")
    return key


def key_path_from_env() -> Path | None:
    """The file named by ``VOLMARGIN_SIGNING_KEY_FILE`` (None when unset)."""
    v = os.environ.get(KEY_ENV)
    return Path(v) if v else None


def address_of(key: bytes) -> str:
    """Checksummed address of a private key."""
    from eth_account import Account

    return str(Account.from_key(key).address)
