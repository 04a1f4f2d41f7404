"""Margin engine: instruments, accounts, collateral, isolated/cross/portfolio margin, liquidation.

Modules: ``params`` (MarginParams, the contract), ``instruments`` (Black-76, P&L), ``accounts``
(dense positions, subaccounts, pools), ``collateral`` (haircuts), ``isolated``, ``cross``, ``portfolio``
(scenario grid, FHS, EWMA correlation), ``liquidation`` (health, partial/full close, fund, bad debt, ADL),
``engine`` (``compute_margin``), ``validation`` (JSON Schemas). Conventions: docs/margin.md.
"""
