"""Networks of the neural volatility-regime forecasters (PyTorch, CPU).

Both encoders read a window ``(batch, L, F)`` of standardized per-bar features and end in the same
:class:`Heads`, plus a linear skip from the last bar's features to the log-variance:

* ``log_var`` ``(batch, H)`` — log of the per-step variance at steps ``1..H``;
* ``regime_logits`` ``(batch, K)`` — next-bar regime;
* ``z_quantiles`` ``(batch, H, Q)`` — standardized return quantiles, increasing in the level by
  construction (first value plus cumulative softplus increments); the return quantile is
  ``exp(log_var / 2) * z``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Heads", "GRUNet", "TCNNet", "build_network"]


def _linear_skip(n_features: int, horizon: int) -> nn.Linear:
    """Linear map from the last bar's standardized features to the log-variance (zero at start).

    With the log HAR means among the inputs this makes every network a superset of a log-HAR
    regression, which keeps small training windows from doing worse than the linear model.
    """
    lin = nn.Linear(n_features, horizon, bias=False)
    nn.init.zeros_(lin.weight)
    return lin


class Heads(nn.Module):
    """Output heads shared by every encoder."""

    def __init__(self, hidden: int, horizon: int, n_regimes: int, n_quantiles: int) -> None:
        super().__init__()
        self.horizon = horizon
        self.n_quantiles = n_quantiles
        self.log_var = nn.Linear(hidden, horizon)
        self.regime = nn.Linear(hidden, max(n_regimes, 1))
        self.quant = nn.Linear(hidden, horizon * max(n_quantiles, 1))

    @torch.no_grad()
    def init_quantiles(self, z: torch.Tensor) -> None:
        """Start the quantile head at the standardized quantiles ``z`` ``(H, Q)`` (increasing in Q).

        The biases are set so that the head outputs ``z`` for every input (first value plus softplus
        increments, inverted) and the weights are zeroed: training then only has to learn the
        conditional deviation from these quantiles. Without this the head starts near
        ``0, 0.69, 1.39, …`` (softplus(0) increments), far from the tails, and the few epochs that
        early stopping on the variance loss allows leave it there.
        """
        z = torch.as_tensor(z, dtype=self.quant.bias.dtype)
        Q = max(self.n_quantiles, 1)
        if z.shape != (self.horizon, Q):
            raise ValueError(f"z must have shape {(self.horizon, Q)}, got {tuple(z.shape)}")
        b = z.clone()
        if Q > 1:
            inc = torch.diff(z, dim=-1).clamp_min(1e-4)
            b[:, 1:] = inc + torch.log(-torch.expm1(-inc))  # softplus^-1
        self.quant.bias.copy_(b.reshape(-1))
        self.quant.weight.zero_()

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"log_var": self.log_var(h), "regime_logits": self.regime(h)}
        raw = self.quant(h).view(h.shape[0], self.horizon, -1)
        if self.n_quantiles > 1:
            inc = nn.functional.softplus(raw[..., 1:])
            out["z_quantiles"] = torch.cat([raw[..., :1], raw[..., :1] + torch.cumsum(inc, dim=-1)], dim=-1)
        else:
            out["z_quantiles"] = raw
        return out


class GRUNet(nn.Module):
    """One-layer GRU encoder; the last hidden state feeds the heads."""

    def __init__(
        self, n_features: int, *, hidden: int, horizon: int, n_regimes: int, n_quantiles: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.rnn = nn.GRU(n_features, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.heads = Heads(hidden, horizon, n_regimes, n_quantiles)
        self.skip = _linear_skip(n_features, horizon)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, h = self.rnn(x)
        out = self.heads(self.drop(h[-1]))
        out["log_var"] = out["log_var"] + self.skip(x[:, -1, :])
        return out


class _CausalBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dilation: int, kernel: int) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation)
        self.res = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(nn.functional.pad(x, (self.pad, 0)))
        return torch.relu(y) + self.res(x)


class TCNNet(nn.Module):
    """Temporal convolutional network: causal dilated convolutions (dilations 1, 2, 4, …)."""

    def __init__(
        self,
        n_features: int,
        *,
        hidden: int,
        horizon: int,
        n_regimes: int,
        n_quantiles: int,
        dropout: float = 0.0,
        kernel: int = 3,
        levels: int = 5,
    ) -> None:
        super().__init__()
        blocks = []
        c = n_features
        for i in range(levels):
            blocks.append(_CausalBlock(c, hidden, 2**i, kernel))
            c = hidden
        self.net = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.heads = Heads(hidden, horizon, n_regimes, n_quantiles)
        self.skip = _linear_skip(n_features, horizon)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.net(x.transpose(1, 2))[:, :, -1]
        out = self.heads(self.drop(h))
        out["log_var"] = out["log_var"] + self.skip(x[:, -1, :])
        return out


def build_network(
    arch: str, n_features: int, *, hidden: int, horizon: int, n_regimes: int, n_quantiles: int, dropout: float
) -> nn.Module:
    """``arch`` in {"gru", "tcn"}."""
    if arch == "gru":
        return GRUNet(
            n_features, hidden=hidden, horizon=horizon, n_regimes=n_regimes, n_quantiles=n_quantiles, dropout=dropout
        )
    if arch == "tcn":
        return TCNNet(
            n_features, hidden=hidden, horizon=horizon, n_regimes=n_regimes, n_quantiles=n_quantiles, dropout=dropout
        )
    raise ValueError(f"arch must be 'gru' or 'tcn', got {arch!r}")
