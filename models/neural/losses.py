"""Losses of the neural forecasters (PyTorch).

* :func:`qlike_loss` — QLIKE of a log-variance forecast against a variance proxy ``y``:
  ``y / f - ln(y / f) - 1`` with ``f = exp(log_f)``; the ``ln y`` term does not depend on the
  forecast, so the loss is computed as ``y * exp(-log_f) + log_f - ln y - 1`` where ``y > 0`` and
  ``y * exp(-log_f) + log_f`` (shifted by a constant) where ``y == 0``. NaN targets are masked.
* :func:`pinball_loss` — quantile (pinball) loss, NaN targets masked.
* :func:`regime_ce_loss` — cross-entropy on regime labels, ``-1`` labels ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["qlike_loss", "pinball_loss", "regime_ce_loss"]


def qlike_loss(log_f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean QLIKE over finite targets; ``log_f`` and ``y`` of the same shape (decimal variance)."""
    mask = torch.isfinite(y)
    if not bool(mask.any()):
        return log_f.sum() * 0.0
    yv = torch.where(mask, y, torch.ones_like(y)).clamp_min(0.0)
    ratio = yv * torch.exp(-log_f)
    log_y = torch.log(yv.clamp_min(1e-30))
    loss = ratio + log_f - torch.where(yv > 0, log_y, log_f.detach() * 0.0) - 1.0
    return (loss * mask).sum() / mask.sum()


def pinball_loss(q: torch.Tensor, y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss. ``q`` (..., Q) quantile forecasts, ``y`` (...) outcomes, ``levels`` (Q,)."""
    mask = torch.isfinite(y)
    if not bool(mask.any()):
        return q.sum() * 0.0
    yv = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(-1)
    diff = yv - q
    loss = torch.maximum(levels * diff, (levels - 1.0) * diff)
    return (loss * mask.unsqueeze(-1)).sum() / (mask.sum() * q.shape[-1])


def regime_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of regime logits ``(n, K)`` against integer labels, ignoring ``-1``."""
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)
