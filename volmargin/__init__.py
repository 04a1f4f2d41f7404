"""volmargin: volatility forecasts turned into margin parameters."""

__version__ = "0.1.0"
