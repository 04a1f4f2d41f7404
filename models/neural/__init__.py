"""Neural volatility-regime forecasters (PyTorch): dataset, networks, losses, trainer, forecasters."""
