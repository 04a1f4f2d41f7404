"""CLI command groups, one module per area (data, train, margin, run). Wired in ``volmargin.cli``."""
