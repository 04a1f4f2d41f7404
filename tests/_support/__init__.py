"""Shared helpers of the test suite (importable as ``_support``: ``tests/`` is on pytest's pythonpath)."""
