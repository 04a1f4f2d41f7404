"""Volatility forecasters. Importing this package registers every built-in forecaster."""
from models.base import FORECASTERS, Forecaster, NotFittedError, VolatilityForecast, get_forecaster, register

__all__ = ["FORECASTERS", "Forecaster", "NotFittedError", "VolatilityForecast", "get_forecaster", "register"]
