"""A task that reports which process ran it (importable by spawned workers; nothing heavy imported)."""

from __future__ import annotations

import os


def pid(_: object) -> int:
    return os.getpid()
