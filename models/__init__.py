"""Volatility forecasters. Importing this package registers every built-in forecaster."""

# Registration side effects: each module adds its forecasters to FORECASTERS.
from models import ewma, garch, har, regime  # noqa: E402,F401,I001
from models.neural import forecaster as _neural  # noqa: E402,F401,I001
from models.base import FORECASTERS, Forecaster, NotFittedError, VolatilityForecast, get_forecaster, register

__all__ = ["FORECASTERS", "Forecaster", "NotFittedError", "VolatilityForecast", "get_forecaster", "register"]
