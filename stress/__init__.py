"""Stress testing: price impact, agents, cascade engine, venues and contagion, scenarios, reverse stress.

The stage after :mod:`backtest`: it reuses the margin engine (:mod:`margin.liquidation`), the population
(:mod:`backtest.population`) and the simulation's timing (:mod:`backtest.simulation`), and adds feedback.
"""
