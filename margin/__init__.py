"""Margin engine and the policies' mappings from a forecast to margin rates.

Engine modules: ``params`` (MarginParams, the contract), ``instruments`` (Black-76, P&L), ``accounts``
(dense positions, subaccounts, pools), ``collateral`` (haircuts), ``isolated``, ``cross``, ``portfolio``
(scenario grid, FHS, EWMA correlation), ``liquidation`` (health, partial/full close, fund, bad debt, ADL),
``engine`` (``compute_margin``), ``validation`` (JSON Schemas). Policy modules: ``path`` (``MarginPath``),
``controls`` (floor, cap, notice), ``policies`` (context, static, EWMA-CCP, GARCH-FHS, oracle), ``predictive``
(the predictive mapping), ``settings`` (pydantic models of the ``controls`` config section).
``margin`` imports only ``models`` and ``data_pipelines``. Conventions: docs/margin.md.
"""
