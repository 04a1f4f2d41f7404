"""Portfolio margin: scenario grid (spot × vol) and filtered historical simulation (FHS) with ES/VaR.

Everything is array arithmetic: scenario P&L per contract ``S`` (instruments × scenarios), positions ``P``
(accounts × instruments), losses ``-P @ S`` (accounts × scenarios), then a reduction over scenarios.

* ``measure="max"``: worst loss over the scenarios (exchange grids).
* ``measure="es"``: expected shortfall, the mean of the ``m = ceil((1 - c) n)`` largest losses (coherent:
  positively homogeneous and sub-additive), ``measure="var"``: the ``m``-th largest loss.
* Margin = ``max(measure, 0)``, computed per *group* of instruments and summed over groups: one group for the
  whole account (portfolio), one per underlying ("cross" with the same risk measure), or one per instrument
  (isolated). With a sub-additive measure, portfolio <= cross <= isolated.
* Grid mode shocks each underlying separately (per-underlying grids, summed: no offsets across
  underlyings, as on Deribit); FHS mode uses *joint* historical scenarios, so offsets across underlyings
  come from the data.
* Add-ons (off by default): short-option contingency ``rate * net short option contracts * F`` per
  underlying, and concentration ``rate * max(|delta notional| - threshold, 0)`` per underlying.
* Maintenance margin = ``mm_fraction * IM``.

FHS: an EWMA (RiskMetrics) covariance filter ``Sigma_t = lam Sigma_{t-1} + (1 - lam) r_{t-1} r_{t-1}'``
de-volatilises and de-correlates each historical joint return, ``z_t = L_t^{-1} r_t`` (``L_t`` the
Cholesky factor of ``Sigma_t``), and re-colours it with today's covariance: scenario ``x = L_now z_t
sqrt(h)`` (log returns over a horizon of ``h`` bars), relative spot shock ``exp(x) - 1``.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np

from margin.instruments import InstrumentArrays, black76_greeks, scenario_pnl
from margin.params import RiskMeasureName, ScenarioGrid

__all__ = [
    "grid_shocks",
    "grid_scenario_matrix",
    "risk_measure",
    "scenario_margin",
    "max_loss_margin_chunked",
    "option_addons",
    "delta_notional",
    "EwmaCorrelation",
    "ewma_covariance_path",
    "fhs_scenarios",
    "aggregate_grid_risk",
]


def grid_shocks(grid: ScenarioGrid) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (spot, vol) relative shocks of the grid, spot-major, each ``(n,)``."""
    s, v = np.meshgrid(np.asarray(grid.spot_shocks), np.asarray(grid.vol_shocks), indexing="ij")
    return s.ravel(), v.ravel()


def grid_scenario_matrix(
    arrays: InstrumentArrays, mark: np.ndarray, sigma: np.ndarray, now: datetime, grid: ScenarioGrid
) -> np.ndarray:
    """``S`` (instruments × n) for the grid, the same shocks applied to each underlying.

    Combine with ``groups=arrays.underlying_index`` in :func:`scenario_margin` to evaluate each
    underlying's grid separately.
    """
    s, v = grid_shocks(grid)
    return scenario_pnl(arrays, mark, sigma, now, s, v)


def _tail_count(n: int, confidence: float) -> int:
    return max(1, math.ceil((1.0 - confidence) * n - 1e-12))


def risk_measure(loss: np.ndarray, measure: RiskMeasureName = "max", confidence: float = 0.99) -> np.ndarray:
    """Risk of scenario losses along the last axis.

    Parameters
    ----------
    loss : np.ndarray
        ``(..., n)`` losses (positive = money lost), USD.
    measure : {"max", "es", "var"}
    confidence : float
        Tail confidence for ES/VaR; the tail holds ``m = ceil((1 - c) n)`` scenarios (at least one).

    Returns
    -------
    np.ndarray
        ``(...)`` risk in USD (may be negative when every scenario gains). NaN propagates.
    """
    loss = np.asarray(loss)
    if measure == "max":
        return loss.max(axis=-1)
    n = loss.shape[-1]
    m = _tail_count(n, confidence)
    part = np.partition(loss, n - m, axis=-1)[..., n - m :]
    if measure == "var":
        return part.min(axis=-1)
    if measure == "es":
        return part.mean(axis=-1)
    raise ValueError(f"measure must be 'max', 'es' or 'var', got {measure!r}")


def scenario_margin(
    positions: np.ndarray,
    s: np.ndarray,
    groups: np.ndarray | None = None,
    measure: RiskMeasureName = "max",
    confidence: float = 0.99,
) -> np.ndarray:
    """Scenario margin ``sum_g max(risk(-P_g @ S_g), 0)`` per account, USD.

    Parameters
    ----------
    positions : np.ndarray
        ``(A, I)`` contracts.
    s : np.ndarray
        ``(I, n)`` P&L per contract per scenario.
    groups : np.ndarray, optional
        ``(I,)`` integer group of each instrument. ``None``: one group (portfolio margin);
        underlying index: per-underlying ("cross"); ``arange(I)``: per instrument (isolated).

    Returns
    -------
    np.ndarray
        ``(A,)`` margin, >= 0.
    """
    p = np.asarray(positions, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if groups is None:
        return np.maximum(risk_measure(-(p @ s), measure, confidence), 0.0)
    groups = np.asarray(groups)
    uniq, g = np.unique(groups, return_inverse=True)
    n_g, n = len(uniq), s.shape[1]
    blk = np.zeros((s.shape[0], n_g, n))
    blk[np.arange(s.shape[0]), g, :] = s
    loss = -(p @ blk.reshape(s.shape[0], n_g * n)).reshape(p.shape[0], n_g, n)
    return np.maximum(risk_measure(loss, measure, confidence), 0.0).sum(axis=1)


def _max_loss_block(st: np.ndarray, positions: np.ndarray, out: np.ndarray, chunk: int) -> None:
    n = st.shape[0]
    buf = np.empty((n, chunk), dtype=st.dtype)
    for c0 in range(0, positions.shape[0], chunk):
        c1 = min(c0 + chunk, positions.shape[0])
        b = buf[:, : c1 - c0]
        np.matmul(st, positions[c0:c1].T, out=b)
        np.max(b, axis=0, out=out[c0:c1])
    np.maximum(out, 0, out=out)


def max_loss_margin_chunked(
    positions: np.ndarray,
    s: np.ndarray,
    chunk: int = 2048,
    out: np.ndarray | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Worst-scenario margin ``max(0, max_k -(P @ S)[:, k])`` in cache-sized chunks (fast path).

    Computes ``-S^T @ P_chunk^T`` into a reused ``(n, chunk)`` buffer (BLAS reads ``P`` row-major without
    a copy) and reduces over scenarios with element-wise maxima across the buffer's rows, so the loss
    matrix never leaves the cache. Works in the dtype of ``positions`` (float32 or float64).

    Parameters
    ----------
    positions : np.ndarray
        ``(A, I)`` contracts, row-major or column-major. Column-major (``np.asfortranarray``) is faster:
        each chunk is then ``I`` contiguous runs and BLAS multiplies without a transposed read.
    s : np.ndarray
        ``(I, n)`` scenario P&L per contract.
    chunk : int
        Accounts per GEMM call.
    out : np.ndarray, optional
        ``(A,)`` output buffer.
    workers : int
        Threads, each running single-threaded BLAS on a contiguous block of accounts (NumPy releases the
        GIL in ``matmul`` and ``max``). BLAS is always limited to one thread inside this call: for this
        skinny product, multi-threaded OpenBLAS thrashes on a shared machine.
    """
    dt = positions.dtype
    st = np.ascontiguousarray(-np.asarray(s, dtype=dt).T)  # (n, I): losses = -S^T P^T
    a = positions.shape[0]
    if out is None:
        out = np.empty(a, dtype=dt)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        threadpool_limits = lambda **_: contextlib.nullcontext()  # noqa: E731
    # always single-threaded BLAS: multi-threaded OpenBLAS on this skinny product slows down 50-150x
    # when the cores are shared; parallelism comes from ``workers``
    if workers <= 1 or a < 2 * chunk:
        with threadpool_limits(limits=1):
            _max_loss_block(st, positions, out, chunk)
        return out
    from concurrent.futures import ThreadPoolExecutor

    edges = np.linspace(0, a, workers + 1).astype(int)
    with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as ex:
        futs = [
            ex.submit(_max_loss_block, st, positions[e0:e1], out[e0:e1], chunk)
            for e0, e1 in zip(edges[:-1], edges[1:], strict=True)
        ]
        for f in futs:
            f.result()
    return out


def delta_notional(
    positions: np.ndarray,
    arrays: InstrumentArrays,
    mark: np.ndarray,
    sigma: np.ndarray,
    now: datetime,
) -> np.ndarray:
    """``(A, U)`` net delta notional per underlying (USD); options via Black-76 delta."""
    d = np.where(arrays.is_inverse, arrays.contract_size, arrays.contract_size * mark)
    if arrays.is_option.any():
        o = arrays.is_option
        t = arrays.time_to_expiry(now)
        g = black76_greeks(mark[o], arrays.strike[o], t[o], sigma[o], arrays.is_call[o])
        d = d.copy()
        d[o] = arrays.contract_size[o] * mark[o] * g["delta"]
    per = np.asarray(positions, dtype=np.float64) * d[None, :]
    out = np.zeros((per.shape[0], len(arrays.underlyings_unique)))
    np.add.at(out.T, arrays.underlying_index, per.T)
    return out


def option_addons(
    positions: np.ndarray,
    arrays: InstrumentArrays,
    mark: np.ndarray,
    sigma: np.ndarray,
    now: datetime,
    grids: list[ScenarioGrid],
) -> np.ndarray:
    """``(A, U)`` contingency add-ons per underlying: short options and concentration.

    ``grids[u]`` is the scenario grid (with the add-on rates) of underlying ``u``; ``mark`` is ``(I,)``.
    Short-option add-on: ``rate * max(-net option contracts * c, 0) * F_u``; concentration add-on:
    ``rate * max(|delta notional_u| - threshold_u, 0)``.
    """
    p = np.asarray(positions, dtype=np.float64)
    n_u = len(arrays.underlyings_unique)
    total = np.zeros((p.shape[0], n_u))
    short_rates = np.array([g.short_option_addon for g in grids])
    conc_rates = np.array([g.concentration_addon for g in grids])
    if np.any(short_rates > 0) and arrays.is_option.any():
        o = arrays.is_option
        net = np.zeros((p.shape[0], n_u))
        np.add.at(net.T, arrays.underlying_index[o], (p[:, o] * arrays.contract_size[o]).T)
        f_u = np.zeros(n_u)
        f_u[arrays.underlying_index] = mark
        total += np.maximum(-net, 0.0) * f_u * short_rates
    if np.any(conc_rates > 0):
        thr = np.array([g.concentration_threshold for g in grids])
        dn = np.abs(delta_notional(p, arrays, mark, sigma, now))
        total += np.maximum(dn - thr, 0.0) * conc_rates
    return total


# ------------------------------------------------------------------------------ EWMA and FHS
class EwmaCorrelation:
    """Real-time EWMA (RiskMetrics) covariance and correlation across underlyings.

    ``Sigma_t = lam * Sigma_{t-1} + (1 - lam) * r_t r_t'`` on decimal log returns per bar.

    Parameters
    ----------
    lam : float
        Decay in (0, 1); 0.94 is RiskMetrics daily.
    initial_cov : np.ndarray
        ``(U, U)`` starting covariance (e.g. the sample covariance of a warm-up window).
    """

    def __init__(self, lam: float, initial_cov: np.ndarray) -> None:
        if not 0.0 < lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {lam}")
        c = np.array(initial_cov, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"initial_cov must be square, got shape {c.shape}")
        self.lam = lam
        self.cov_ = c

    def update(self, r: np.ndarray) -> np.ndarray:
        """Fold in one bar of joint returns ``(U,)`` and return the new correlation matrix."""
        r = np.asarray(r, dtype=np.float64)
        self.cov_ = self.lam * self.cov_ + (1.0 - self.lam) * np.outer(r, r)
        return self.corr_

    @property
    def corr_(self) -> np.ndarray:
        sd = np.sqrt(np.diag(self.cov_))
        c = self.cov_ / np.outer(sd, sd)
        np.fill_diagonal(c, 1.0)
        return c

    @property
    def vol_(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov_))


def ewma_covariance_path(returns: np.ndarray, lam: float, warmup: int = 20) -> np.ndarray:
    """Predictive EWMA covariances: ``out[t]`` uses returns before ``t`` only, shape ``(T, U, U)``.

    The filter starts from the sample covariance (about zero mean) of the first ``warmup`` rows.
    """
    r = np.asarray(returns, dtype=np.float64)
    t_n, u = r.shape
    w = max(1, min(warmup, t_n))
    c = r[:w].T @ r[:w] / w + 1e-12 * np.eye(u)
    out = np.empty((t_n, u, u))
    for t in range(t_n):
        out[t] = c
        c = lam * c + (1.0 - lam) * np.outer(r[t], r[t])
    return out


def fhs_scenarios(
    returns: np.ndarray, lam: float = 0.94, horizon: int = 1, warmup: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Joint filtered-historical scenarios of relative spot moves, ``(n, U)``, and today's EWMA correlation.

    Parameters
    ----------
    returns : np.ndarray
        ``(T, U)`` joint historical decimal log returns per bar (rows aligned in time).
    lam : float
        EWMA decay.
    horizon : int
        Bars of the liquidation horizon (scaled by ``sqrt(horizon)``).
    warmup : int
        Rows used to start the filter; the scenarios use rows ``warmup..T-1``.

    Returns
    -------
    shocks : np.ndarray
        ``(T - warmup, U)`` relative spot shocks ``exp(x) - 1``.
    corr_now : np.ndarray
        ``(U, U)`` EWMA correlation after the last row (the real-time correlation).
    """
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] <= warmup:
        raise ValueError(f"returns must be (T, U) with T > warmup={warmup}, got shape {r.shape}")
    path = ewma_covariance_path(r, lam, warmup)
    now = lam * path[-1] + (1.0 - lam) * np.outer(r[-1], r[-1])
    chol = np.linalg.cholesky(path[warmup:])  # (n, U, U)
    z = np.linalg.solve(chol, r[warmup:, :, None])[..., 0]  # (n, U) standardised, decorrelated
    x = z @ np.linalg.cholesky(now).T * math.sqrt(horizon)
    sd = np.sqrt(np.diag(now))
    return np.expm1(x), now / np.outer(sd, sd)


def aggregate_grid_risk(risk_u: np.ndarray, sign_u: np.ndarray, corr: np.ndarray, stress_weight: float) -> np.ndarray:
    """Grid risk with offsets across underlyings, ``sqrt(max(m' L m, 0))`` per account, USD.

    ``m`` (``(A, U)``, >= 0) is each underlying's worst grid loss; ``s`` (``(A, U)``, +-1) the direction of that
    worst scenario (+1 when it is a spot fall, -1 a rise). The loss correlation is
    ``L = (1 - w) (s s') o R + w 1 1'``: the return correlation ``R`` signed by the directions, blended toward 1 with
    the stress weight ``w``. Since every entry of ``L`` is at most 1 and ``m >= 0``, the result never exceeds
    ``sum_u m_u`` (the grid without offsets), and equals it when ``w = 1`` or when ``R = 1`` and all directions
    agree; ``L`` is positive semi-definite when ``R`` is (Schur product with ``s s'``), so the square root is real.
    """
    m = np.asarray(risk_u, dtype=np.float64)
    s = np.asarray(sign_u, dtype=np.float64)
    r = np.asarray(corr, dtype=np.float64)
    sm = m * s
    q = (1.0 - stress_weight) * ((sm @ r) * sm).sum(axis=1) + stress_weight * m.sum(axis=1) ** 2
    return np.minimum(np.sqrt(np.maximum(q, 0.0)), m.sum(axis=1))
