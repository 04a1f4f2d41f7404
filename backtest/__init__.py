"""The backtest stage: evaluation of margin policies on history (after ``margin``, before ``stress``).

Modules: ``population`` (the seeded trader population), ``simulation`` (the bar-by-bar replay through the
engine's liquidation rule: ``run_backtest``, ``BacktestConfig``, ``BacktestResult``), ``frontier``
(liquidations and bad debt against collateral), ``bound`` (the perfect-foresight cohort optimizer),
``fit`` (the predictive policy's search before the cut), ``factory`` (``make_policy`` by name),
``settings`` (the pydantic models of this stage's config sections). It imports ``margin``, ``models`` and
``data_pipelines``, never ``training``, ``serving`` or ``volmargin``.
"""
