"""Statistical tests of forecast quality and risk coverage.

* Diebold-Mariano equal predictive accuracy with a HAC (Newey-West) variance and the
  Harvey-Leybourne-Newbold (1997) small-sample correction (Student t with ``n - 1`` df).
* Hansen, Lunde & Nason (2011) model confidence set through ``arch.bootstrap.MCS`` (seeded).
* Hansen (2005) test of superior predictive ability through ``arch.bootstrap.SPA`` (seeded): is the best of
  many candidates (e.g. a hyperparameter search's trials) better than a benchmark, accounting for the search.
* VaR coverage on any breach indicator array: Kupiec (1995) proportion of failures ``LR_uc``,
  Christoffersen (1998) independence ``LR_ind`` and conditional coverage ``LR_cc``.
* Basel traffic light for 99% VaR scaled to the sample length by binomial quantiles.

The coverage tests take plain 0/1 breach arrays so that the job layer can apply them to margin
breaches (a position's loss exceeding its margin) as well as to VaR exceptions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from training.metrics import newey_west_variance

__all__ = [
    "DMResult",
    "diebold_mariano",
    "MCSResult",
    "model_confidence_set",
    "SPAResult",
    "superior_predictive_ability",
    "CoverageResult",
    "TrafficLight",
    "kupiec_pof",
    "christoffersen_independence",
    "coverage_test",
    "traffic_light",
    "traffic_light_bounds",
    "var_breaches",
]

Alternative = Literal["two-sided", "less", "greater"]


# ---------------------------------------------------------------------------- Diebold-Mariano
@dataclass(frozen=True)
class DMResult:
    """Diebold-Mariano test of ``E[loss_a - loss_b] = 0``.

    ``stat`` is the HLN-corrected statistic when ``hln`` was requested; negative means model ``a`` has
    the lower loss. ``pvalue`` follows ``alternative``: "less" tests that ``a`` is better.
    """

    stat: float
    pvalue: float
    mean_diff: float
    n: int
    horizon: int
    lags: int
    hln: bool
    alternative: str

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


def diebold_mariano(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    *,
    horizon: int = 1,
    lags: int | None = None,
    kernel: Literal["bartlett", "uniform"] = "bartlett",
    hln: bool = True,
    alternative: Alternative = "two-sided",
) -> DMResult:
    """Diebold-Mariano test on two per-row loss series.

    Parameters
    ----------
    loss_a, loss_b : np.ndarray
        Per-row losses of the two forecasts on the same targets (1-D, same length); pairs with a NaN are
        dropped.
    horizon : int
        Forecast horizon ``h`` in bars; sets the default HAC lag ``h - 1`` and the HLN correction.
    lags : int, optional
        HAC lags; default ``horizon - 1``.
    kernel : {"bartlett", "uniform"}
        Newey-West (Bartlett) weights, or the original DM rectangular window (falls back to Bartlett when
        the rectangular estimate is not positive).
    hln : bool
        Apply the Harvey-Leybourne-Newbold correction
        ``sqrt((n + 1 - 2h + h(h-1)/n) / n)`` and use Student t(n-1); otherwise standard normal.
    alternative : {"two-sided", "less", "greater"}
        "less": ``a`` has lower expected loss than ``b``.

    Returns
    -------
    DMResult
    """
    a = np.asarray(loss_a, dtype=float).ravel()
    b = np.asarray(loss_b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"loss_a and loss_b must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    lags = horizon - 1 if lags is None else int(lags)
    if lags < 0:
        raise ValueError(f"lags must be >= 0, got {lags}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n = len(d)
    if n < 3:
        raise ValueError(f"diebold_mariano needs at least 3 finite loss pairs, got {n}")
    mean = float(d.mean())
    if kernel == "uniform":
        dc = d - mean
        lrv = float(dc @ dc) / n + 2.0 * sum(float(dc[j:] @ dc[:-j]) / n for j in range(1, min(lags, n - 1) + 1))
        if lrv <= 0:
            lrv = newey_west_variance(d, lags)
    elif kernel == "bartlett":
        lrv = newey_west_variance(d, lags)
    else:
        raise ValueError(f"kernel must be 'bartlett' or 'uniform', got {kernel!r}")
    if lrv <= 0:
        stat = 0.0 if mean == 0 else float(np.sign(mean) * np.inf)
    else:
        stat = mean / np.sqrt(lrv / n)
    h = horizon
    if hln:
        stat *= np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
        dist = stats.t(df=n - 1)
    else:
        dist = stats.norm()
    if alternative == "two-sided":
        p = 2.0 * dist.sf(abs(stat))
    elif alternative == "less":
        p = dist.cdf(stat)
    else:
        p = dist.sf(stat)
    return DMResult(
        stat=float(stat),
        pvalue=float(min(1.0, p)),
        mean_diff=mean,
        n=n,
        horizon=h,
        lags=lags,
        hln=hln,
        alternative=alternative,
    )


# ---------------------------------------------------------------------------- model confidence set
@dataclass(frozen=True)
class MCSResult:
    """Model confidence set: the models kept at level ``1 - size`` and each model's MCS p-value."""

    included: tuple[str, ...]
    excluded: tuple[str, ...]
    pvalues: dict[str, float]
    size: float
    method: str
    reps: int
    seed: int | None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["included"] = list(self.included)
        d["excluded"] = list(self.excluded)
        return d


def model_confidence_set(
    losses: pd.DataFrame,
    *,
    size: float = 0.10,
    reps: int = 1000,
    block_size: int | None = None,
    method: Literal["R", "max"] = "R",
    seed: int | None = 0,
) -> MCSResult:
    """Hansen's model confidence set via ``arch.bootstrap.MCS`` (stationary bootstrap).

    Parameters
    ----------
    losses : pd.DataFrame
        Per-row losses, one column per model (rows with any NaN are dropped).
    size : float
        Test size in (0, 1); the set contains the best model with probability ``1 - size``.
    reps : int
        Bootstrap replications.
    block_size : int, optional
        Mean block length; default arch's ``sqrt(n)``.
    method : {"R", "max"}
        Statistic of the elimination rule.
    seed : int, optional
        Seed of the bootstrap (numpy ``default_rng``), for reproducibility.
    """
    from arch.bootstrap import MCS

    if not isinstance(losses, pd.DataFrame):
        raise TypeError(f"losses must be a DataFrame (one column per model), got {type(losses).__name__}")
    if not 0 < size < 1:
        raise ValueError(f"size must be in (0, 1), got {size}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    clean = losses.replace([np.inf, -np.inf], np.nan).dropna()
    names = [str(c) for c in clean.columns]
    if len(names) == 0:
        raise ValueError("losses has no model columns")
    if len(names) == 1:
        return MCSResult((names[0],), (), {names[0]: 1.0}, size, method, reps, seed)
    if len(clean) < 10:
        raise ValueError(f"model_confidence_set needs at least 10 complete loss rows, got {len(clean)}")
    clean = clean.copy()
    clean.columns = names
    rng = np.random.default_rng(seed) if seed is not None else None
    mcs = MCS(clean, size=size, reps=reps, block_size=block_size, method=method, seed=rng)
    mcs.compute()
    pv = mcs.pvalues["Pvalue"]
    pvalues = {str(k): float(v) for k, v in pv.items()}
    included = tuple(str(m) for m in mcs.included)
    excluded = tuple(str(m) for m in mcs.excluded)
    return MCSResult(included, excluded, pvalues, size, method, reps, seed)


# ---------------------------------------------------------------------------- superior predictive ability
@dataclass(frozen=True)
class SPAResult:
    """Hansen's SPA test: p-values of "no candidate beats the benchmark" (``consistent`` is the one to read;
    ``lower``/``upper`` bound it), the candidates and rows used, and the candidate with the lowest mean loss."""

    pvalue: float
    pvalue_lower: float
    pvalue_upper: float
    n: int
    k: int
    best: str
    reps: int
    seed: int | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def superior_predictive_ability(
    benchmark: pd.Series,
    candidates: pd.DataFrame,
    *,
    reps: int = 1000,
    block_size: int | None = None,
    seed: int | None = 0,
) -> SPAResult:
    """Hansen (2005) SPA test of ``candidates`` against ``benchmark`` via ``arch.bootstrap.SPA`` (stationary
    bootstrap, studentized): small p-values say that at least one candidate has a lower expected loss than the
    benchmark, with the selection of the best among all ``k`` candidates accounted for (the Diebold-Mariano
    p-value of the best one alone is optimistic: it ignores that it was chosen as the best of ``k``).

    Parameters
    ----------
    benchmark : pd.Series
        Per-row losses of the benchmark (e.g. the champion's per-origin QLIKE).
    candidates : pd.DataFrame
        Per-row losses, one column per candidate, on the same index; rows with any NaN (or a NaN benchmark)
        are dropped.
    reps, block_size, seed
        Bootstrap replications, mean block length (default arch's), seed (numpy ``default_rng``).
    """
    from arch.bootstrap import SPA

    if not isinstance(candidates, pd.DataFrame) or candidates.shape[1] == 0:
        raise ValueError("candidates must be a DataFrame with at least one loss column")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    both = pd.concat([benchmark.rename("__benchmark__"), candidates], axis=1, join="inner")
    both = both.replace([np.inf, -np.inf], np.nan).dropna()
    if len(both) < 10:
        raise ValueError(f"superior_predictive_ability needs at least 10 complete loss rows, got {len(both)}")
    cand = both.drop(columns="__benchmark__")
    rng = np.random.default_rng(seed) if seed is not None else None
    spa = SPA(both["__benchmark__"].to_numpy(), cand.to_numpy(), block_size=block_size, reps=reps,
              bootstrap="stationary", studentize=True, nested=False, seed=rng)
    spa.compute()
    pv = spa.pvalues
    return SPAResult(float(pv["consistent"]), float(pv["lower"]), float(pv["upper"]), len(both), cand.shape[1],
                     str(cand.mean().idxmin()), reps, seed)


# ---------------------------------------------------------------------------- VaR coverage
def _breaches(breaches: np.ndarray) -> np.ndarray:
    x = np.asarray(breaches)
    if x.ndim != 1:
        raise ValueError(f"breaches must be 1-D, got shape {x.shape}")
    if x.dtype != bool:
        xf = x.astype(float)
        xf = xf[np.isfinite(xf)]
        if np.any((xf != 0) & (xf != 1)):
            raise ValueError("breaches must contain only 0/1 (or bool) values")
        return xf.astype(bool)
    return x


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0 else float(x * np.log(y))


def kupiec_pof(breaches: np.ndarray, p: float) -> tuple[float, float]:
    """Kupiec (1995) proportion-of-failures test.

    Parameters
    ----------
    breaches : np.ndarray
        1-D 0/1 indicator of exceptions (loss beyond VaR / margin); NaN entries are ignored.
    p : float
        Expected exception probability in (0, 1) (0.01 for 99% VaR).

    Returns
    -------
    (LR_uc, pvalue)
        ``LR_uc = -2 ln[(1-p)^(n-x) p^x / ((1-x/n)^(n-x) (x/n)^x)]``, chi-square(1) p-value.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    b = _breaches(breaches)
    n = len(b)
    if n == 0:
        raise ValueError("breaches is empty")
    x = int(b.sum())
    phat = x / n
    ll0 = _xlogy(n - x, 1 - p) + _xlogy(x, p)
    ll1 = _xlogy(n - x, 1 - phat) + _xlogy(x, phat)
    lr = max(0.0, -2.0 * (ll0 - ll1))
    return float(lr), float(stats.chi2.sf(lr, 1))


def _transitions(b: np.ndarray) -> tuple[int, int, int, int]:
    prev, cur = b[:-1], b[1:]
    n00 = int(np.sum(~prev & ~cur))
    n01 = int(np.sum(~prev & cur))
    n10 = int(np.sum(prev & ~cur))
    n11 = int(np.sum(prev & cur))
    return n00, n01, n10, n11


def christoffersen_independence(breaches: np.ndarray) -> tuple[float, float]:
    """Christoffersen (1998) independence test of a first-order Markov breach sequence.

    ``LR_ind = -2 ln[L(pi) / L(pi01, pi11)]`` on the transition counts ``n_ij`` (state i followed by j),
    chi-square(1) p-value. With no breach, or no transition out of a breach, the statistic is 0.
    """
    b = _breaches(breaches)
    if len(b) < 2:
        raise ValueError(f"breaches needs at least 2 observations, got {len(b)}")
    n00, n01, n10, n11 = _transitions(b)
    pi = (n01 + n11) / (n00 + n01 + n10 + n11)
    pi01 = n01 / (n00 + n01) if n00 + n01 else 0.0
    pi11 = n11 / (n10 + n11) if n10 + n11 else 0.0
    ll0 = _xlogy(n00 + n10, 1 - pi) + _xlogy(n01 + n11, pi)
    ll1 = _xlogy(n00, 1 - pi01) + _xlogy(n01, pi01) + _xlogy(n10, 1 - pi11) + _xlogy(n11, pi11)
    lr = max(0.0, -2.0 * (ll0 - ll1))
    return float(lr), float(stats.chi2.sf(lr, 1))


class TrafficLight(StrEnum):
    """Basel backtesting zones."""

    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


def traffic_light_bounds(n: int, p: float = 0.01, *, green: float = 0.95, yellow: float = 0.9999) -> tuple[int, int]:
    """Smallest exception counts of the yellow and the red zone for ``n`` observations.

    The zone of ``x`` exceptions follows the binomial cumulative probability ``P(X <= x)`` with
    ``X ~ Bin(n, p)``: green below ``green`` (95%), yellow below ``yellow`` (99.99%), red otherwise.
    At ``n = 250, p = 0.01`` this gives (5, 10): green 0-4, yellow 5-9, red 10+ (Basel Committee, 1996).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    x = np.arange(n + 1)
    cdf = stats.binom.cdf(x, n, p)
    first_yellow = int(np.argmax(cdf >= green)) if np.any(cdf >= green) else n + 1
    first_red = int(np.argmax(cdf >= yellow)) if np.any(cdf >= yellow) else n + 1
    return first_yellow, first_red


def traffic_light(breaches: np.ndarray | int, n: int | None = None, p: float = 0.01) -> TrafficLight:
    """Basel traffic light zone of an exception count (or a breach array) over ``n`` observations."""
    if isinstance(breaches, int | np.integer):
        if n is None:
            raise ValueError("n is required when breaches is a count")
        x = int(breaches)
        if not 0 <= x <= n:
            raise ValueError(f"breach count must be in [0, {n}], got {x}")
    else:
        b = _breaches(breaches)
        x, n = int(b.sum()), len(b)
    y0, r0 = traffic_light_bounds(int(n), p)
    if x >= r0:
        return TrafficLight.RED
    if x >= y0:
        return TrafficLight.YELLOW
    return TrafficLight.GREEN


@dataclass(frozen=True)
class CoverageResult:
    """Coverage of a breach series against an expected exception probability ``p``."""

    n: int
    breaches: int
    rate: float
    expected: float
    lr_uc: float
    p_uc: float
    lr_ind: float
    p_ind: float
    lr_cc: float
    p_cc: float
    traffic_light: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def coverage_test(breaches: np.ndarray, p: float) -> CoverageResult:
    """Kupiec, Christoffersen independence and conditional coverage (``LR_cc = LR_uc + LR_ind``, chi2(2)).

    The traffic light is reported for ``p = 0.01`` (99% VaR) only.
    """
    b = _breaches(breaches)
    lr_uc, p_uc = kupiec_pof(b, p)
    lr_ind, p_ind = christoffersen_independence(b)
    lr_cc = lr_uc + lr_ind
    tl = traffic_light(b, p=p).value if abs(p - 0.01) < 1e-12 else None
    return CoverageResult(
        n=len(b),
        breaches=int(b.sum()),
        rate=float(b.mean()),
        expected=float(p),
        lr_uc=lr_uc,
        p_uc=p_uc,
        lr_ind=lr_ind,
        p_ind=p_ind,
        lr_cc=float(lr_cc),
        p_cc=float(stats.chi2.sf(lr_cc, 2)),
        traffic_light=tl,
    )


def var_breaches(returns: np.ndarray, variance: np.ndarray, level: float, *, dist: str = "normal", nu: float = 6.0) -> np.ndarray:
    """Exceptions of a zero-mean parametric long-side VaR: ``ret < q_{1-level} * sqrt(variance)``.

    Parameters
    ----------
    returns : np.ndarray
        Realized decimal log returns of the forecast bars.
    variance : np.ndarray
        One-step variance forecasts for the same bars.
    level : float
        VaR confidence in (0, 1), e.g. 0.99.
    dist : {"normal", "t"}
        Standardized distribution (the t is scaled to unit variance).

    Returns
    -------
    np.ndarray
        Float array of 0/1, NaN where either input is NaN.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    r = np.asarray(returns, dtype=float)
    v = np.asarray(variance, dtype=float)
    if dist == "normal":
        q = stats.norm.ppf(1 - level)
    elif dist == "t":
        if nu <= 2:
            raise ValueError(f"nu must be > 2, got {nu}")
        q = stats.t.ppf(1 - level, nu) * np.sqrt((nu - 2) / nu)
    else:
        raise ValueError(f"dist must be 'normal' or 't', got {dist!r}")
    out = (r < q * np.sqrt(v)).astype(float)
    out[~(np.isfinite(r) & np.isfinite(v))] = np.nan
    return out
