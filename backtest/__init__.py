"""The backtest stage: evaluation of margin policies on history (after ``margin``, before ``stress``).

Modules: ``population`` (the seeded trader population), ``simulation`` (the bar-by-bar replay through the
engine's liquidation rule: ``run_backtest``, ``BacktestConfig``, ``BacktestResult``), ``bound`` (the
clairvoyant relaxation no deployable policy can beat), ``budgets`` (static (IM, MM) pairs at a collateral
level, policies scaled to a budget, the share of the bound), ``fit`` (the predictive policy's search before
the cut), ``headline`` (one asset's comparison at every budget and the forecast ablation), ``factory``
(``make_policy`` by name), ``settings`` (the pydantic models of this stage's config sections). It imports ``margin``, ``models`` and
``data_pipelines``, never ``training``, ``serving`` or ``volmargin``.
"""
