"""Neural volatility-regime forecasters: "gru", "tcn" and "hybrid" (log-HAR + GRU correction).

``fit(frame)``
    1. splits the bars into a training part and a validation block at the end (``val_frac``);
    2. fits the regime model (:class:`models.regime.RegimeForecaster`) on the training part and
       filters regime probabilities over all bars (forward filter, no look-ahead);
    3. builds per-bar features (:mod:`models.neural.dataset`), standardizes them with a scaler
       fitted on the training part only, cuts ``lookback``-bar windows;
    4. trains the network (:mod:`models.neural.trainer`): QLIKE of the log-variance head against the
       target proxy at steps ``1..horizon``, pinball loss of the quantile head (started at the
       training returns' standardized quantiles), cross-entropy of the regime head; early stopping
       on the validation QLIKE; deterministic on CPU;
    5. refits the quantile head's intercepts on the training windows (exact pinball minimiser per
       step and level, ``refit_intercepts``);
    6. records the breach rates of the quantiles on the validation block in
       ``quantile_calibration_`` and, when asked (``quantile_calibration``), corrects the quantiles
       to match them (:mod:`models.neural.calibration`).

Return quantiles are per step, like the variance: ``quantiles[i, k-1, j]`` is the ``levels[j]``
quantile of the one-bar return of bar ``t + k``, ``sigma_k`` times the (calibrated) standardized
quantile, non-decreasing across levels.

``update(new_bars)`` appends bars to a short buffer (and advances the regime filter); nothing is
retrained. ``predict_variance(h)`` runs the network on the last window; steps beyond the trained
``horizon`` repeat the last trained step. ``predict_path(frame, h)`` gives the same forecasts for
every origin of a frame in one batched pass (for out-of-sample evaluation).

The hybrid model adds the network's output to the log of a log-HAR forecast (fitted on the training
part): the network learns a correction in log space.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from models._inputs import VARIANCE_FLOOR, aligned_returns
from models.base import Forecaster, VolatilityForecast, _utc, register
from models.har import LogHAR
from models.neural.calibration import METHODS, fit_quantile_calibration, intercept_offsets, monotone_levels
from models.neural.dataset import (
    bar_features,
    default_windows,
    feature_columns,
    fit_scaler,
    make_windows,
    target_proxy,
)
from models.neural.networks import build_network
from models.neural.trainer import TrainConfig, predict_network, set_determinism, train_network
from models.regime import RegimeForecaster

__all__ = ["NeuralForecaster", "TCNForecaster", "HybridForecaster"]

logger = logging.getLogger(__name__)


def _standardized(y_ret: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """Returns over the network's per-step volatility (NaN where the return is unknown)."""
    return y_ret / np.sqrt(np.maximum(np.exp(log_var), VARIANCE_FLOOR))


def _complete_ends(feats: np.ndarray, lookback: int) -> np.ndarray:
    """Positions ``e`` whose window ``e-lookback+1 … e`` has only finite features."""
    bad = (~np.all(np.isfinite(feats), axis=1)).astype(np.int64)
    cb = np.concatenate([[0], np.cumsum(bad)])
    e = np.arange(lookback - 1, len(feats))
    return e[(cb[e + 1] - cb[e + 1 - lookback]) == 0]


@register
class NeuralForecaster(Forecaster):
    """GRU volatility-regime forecaster.

    Parameters
    ----------
    lookback : int
        Window length in bars.
    horizon : int
        Steps of the log-variance and quantile heads.
    hidden : int
        Hidden size of the encoder.
    target : str
        Variance proxy the QLIKE loss is taken against: ``"var_gk"`` (default, the project's scoring
        proxy), another variance column, or ``"ret2"`` (squared returns).
    max_epochs, patience, batch_size, lr, weight_decay, dropout
        Training settings (AdamW, early stopping on validation QLIKE).
    val_frac : float
        Fraction of the bars at the end of the fit window used as the validation block.
    n_regimes : int
        Regimes of the regime model (inputs and regime head); ``use_regimes=False`` drops them.
    quantile_levels : tuple of float
        Levels of the return quantile head.
    seed : int
        Seed of weight initialisation, shuffling and the regime mixture.
    n_threads : int
        Torch CPU threads during training.
    resid_bars : int
        Number of most recent bars whose one-step standardized residuals are kept (for FHS).
    min_train_windows : int
        Fewest training windows accepted by ``fit``.
    refit_intercepts : bool
        After training, set the quantile head's intercept per step and level to the exact minimiser
        of the training pinball loss (the empirical quantile of the standardized residuals, kept in
        ``quantile_offset_``): the few epochs that early stopping on the variance loss allows leave
        the head's intercepts unfinished.
    quantile_calibration : {"none", "scale", "shift"}
        Correction of the standardized return quantiles fitted on the validation block (the end of
        the fit window; :mod:`models.neural.calibration`): ``"scale"`` one dispersion factor,
        ``"shift"`` split-conformal shifts per level; a block with fewer than 250 origins is not
        used. Off by default: with the head started at the data's quantiles and its intercepts
        refitted, the uncorrected breach rates were within sampling error out of sample and a
        correction from a short block only added noise. The block's breach rates are kept in
        ``quantile_calibration_`` either way (a diagnostic of the head; see :meth:`diagnostics`).
    """

    name = "gru"
    _arch: ClassVar[str] = "gru"
    _hybrid: ClassVar[bool] = False
    required_columns = ("ret", "var_gk")
    #: defaults for instances pickled before the parameters existed (``__init__`` always sets them)
    refit_intercepts: bool = False
    quantile_calibration: str = "none"
    #: counters reported by :meth:`diagnostics` (cumulative over the refits of this instance)
    _counters: ClassVar[tuple[str, ...]] = ("n_quantile_head_off_",)
    _persistent = _counters

    def __init__(
        self,
        *,
        lookback: int = 60,
        horizon: int = 10,
        hidden: int = 16,
        target: str = "var_gk",
        max_epochs: int = 30,
        patience: int = 5,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.0,
        val_frac: float = 0.2,
        n_regimes: int = 3,
        use_regimes: bool = True,
        quantile_levels: tuple[float, ...] = (0.01, 0.05, 0.95, 0.99),
        seed: int = 0,
        n_threads: int = 1,
        resid_bars: int = 2000,
        min_train_windows: int = 200,
        refit_intercepts: bool = True,
        quantile_calibration: str = "none",
    ) -> None:
        self.lookback = lookback
        self.horizon = horizon
        self.hidden = hidden
        self.target = target
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.val_frac = val_frac
        self.n_regimes = n_regimes
        self.use_regimes = use_regimes
        self.quantile_levels = quantile_levels
        self.seed = seed
        self.n_threads = n_threads
        self.resid_bars = resid_bars
        self.min_train_windows = min_train_windows
        self.refit_intercepts = refit_intercepts
        self.quantile_calibration = quantile_calibration

    @classmethod
    def test_params(cls) -> dict[str, Any]:
        return {"lookback": 20, "hidden": 8, "horizon": 5, "max_epochs": 3, "min_train_windows": 100}

    # ------------------------------------------------------------------ helpers
    def _check_params(self, frame: pd.DataFrame) -> None:
        for k in ("lookback", "horizon", "hidden", "max_epochs", "batch_size", "resid_bars"):
            v = getattr(self, k)
            if not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if not 0.0 < float(self.val_frac) < 0.5:
            raise ValueError(f"val_frac must be in (0, 0.5), got {self.val_frac!r}")
        lv = np.asarray(self.quantile_levels, dtype=np.float64)
        if lv.ndim != 1 or len(lv) < 1 or np.any((lv <= 0) | (lv >= 1)) or np.any(np.diff(lv) <= 0):
            raise ValueError(f"quantile_levels must be increasing levels in (0, 1), got {self.quantile_levels!r}")
        if self.quantile_calibration not in METHODS:
            raise ValueError(f"quantile_calibration must be one of {METHODS}, got {self.quantile_calibration!r}")
        if self.target != "ret2" and self.target not in frame.columns:
            raise ValueError(f"target must be 'ret2' or a variance column of the frame, got {self.target!r}")

    def _feats(self, frame: pd.DataFrame, probs: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled and scaled feature arrays ``(n, F)``."""
        raw = bar_features(frame, self.columns_, self.windows_, probs).to_numpy()
        return raw, (raw - self.feat_mean_) / self.feat_scale_

    def _base(self, raw: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        if not self._hybrid:
            return None
        X = np.exp(raw[ends][:, self.har_cols_])
        return np.column_stack([np.log(self.har_._apply(X, k)) for k in range(int(self.horizon))])

    @property
    def _buflen(self) -> int:
        return int(self.lookback) + max(self.windows_) + 1

    def diagnostics(self) -> dict[str, int]:
        """Counters of this instance over all its fits (zero when all is well): ``quantile_head_off``
        counts fits whose uncorrected quantile head breached some level on the validation block at
        a rate outside the 99.9 % binomial interval (see ``quantile_calibration_``)."""
        return {k.removeprefix("n_").removesuffix("_"): int(getattr(self, k, 0) or 0) for k in self._counters}

    # ------------------------------------------------------------------ fit
    def _fit(self, frame: pd.DataFrame) -> None:
        self._check_params(frame)
        for k in self._counters:
            setattr(self, k, getattr(self, k, 0))
        n = len(frame)
        n_tr = int(round(n * (1.0 - float(self.val_frac))))
        H, L = int(self.horizon), int(self.lookback)
        self.columns_ = feature_columns(frame)
        self.windows_ = default_windows(frame.attrs.get("bars_per_year"))
        self.buffer_columns_ = [c for c in dict.fromkeys(["ret", "ret_bars", "var_gk", *self.columns_]) if c in frame]
        probs = None
        if self.use_regimes:
            self.regime_ = RegimeForecaster(n_regimes=int(self.n_regimes), seed=int(self.seed)).fit(frame.iloc[:n_tr])
            probs = self.regime_.regime_probabilities(frame)
        raw = bar_features(frame, self.columns_, self.windows_, probs).to_numpy()
        self.feature_names_ = list(bar_features(frame.iloc[:2], self.columns_, self.windows_, probs).columns)
        self.har_cols_ = [i for i, c in enumerate(self.feature_names_) if c.startswith("log_har_")]
        scaler = fit_scaler(raw[:n_tr])
        self.feat_mean_, self.feat_scale_ = scaler.mean_.copy(), scaler.scale_.copy()
        fs = (raw - self.feat_mean_) / self.feat_scale_
        proxy = target_proxy(frame, self.target)
        rets = aligned_returns(frame)
        labels = None
        if probs is not None:
            p = probs.to_numpy()
            labels = np.where(np.all(np.isfinite(p), axis=1), np.argmax(np.nan_to_num(p), axis=1), -1)
        ends = _complete_ends(fs, L)
        tr_ends = ends[ends + H <= n_tr - 1]
        va_ends = ends[(ends >= n_tr - 1) & (ends <= n - 2)]
        if len(tr_ends) < int(self.min_train_windows) or len(va_ends) < 10:
            raise ValueError(
                f"{type(self).__name__} needs at least min_train_windows={self.min_train_windows} training windows "
                f"and 10 validation windows; {n} bars with lookback={L}, horizon={H}, val_frac={self.val_frac} "
                f"give {len(tr_ends)} and {len(va_ends)}"
            )
        if self._hybrid:
            self.har_ = LogHAR(max_horizon=H, windows=self.windows_, column="var_gk").fit(frame.iloc[:n_tr])
        train = make_windows(fs, proxy, rets, labels, lookback=L, horizon=H, ends=tr_ends)
        val = make_windows(fs, proxy, rets, labels, lookback=L, horizon=H, ends=va_ends)
        cfg = TrainConfig(
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            batch_size=int(self.batch_size),
            max_epochs=int(self.max_epochs),
            patience=int(self.patience),
            seed=int(self.seed),
            n_threads=int(self.n_threads),
            quantile_levels=tuple(self.quantile_levels),
            w_regime=0.1 if self.use_regimes else 0.0,
        )
        set_determinism(cfg.seed, cfg.n_threads)  # weight initialisation depends on the seed only
        net = build_network(
            self._arch,
            fs.shape[1],
            hidden=int(self.hidden),
            horizon=H,
            n_regimes=int(self.n_regimes) if self.use_regimes else 1,
            n_quantiles=len(self.quantile_levels),
            dropout=float(self.dropout),
        )
        self.train_result_ = train_network(
            net, train, val, cfg, base_train=self._base(raw, tr_ends), base_val=self._base(raw, va_ends)
        )
        self.net_ = net
        levels = tuple(float(x) for x in self.quantile_levels)
        self.quantile_offset_ = np.zeros((H, len(levels)))
        if self.refit_intercepts:
            out = predict_network(net, train.X, self._base(raw, tr_ends))
            self.quantile_offset_ = intercept_offsets(_standardized(train.y_ret, out["log_var"]), out["z_quantiles"], levels)
        out = predict_network(net, val.X, self._base(raw, va_ends))
        self.quantile_calibration_ = fit_quantile_calibration(
            _standardized(val.y_ret, out["log_var"]),
            monotone_levels(out["z_quantiles"] + self.quantile_offset_),
            levels,
            method=self.quantile_calibration,  # type: ignore[arg-type]
            block=(frame.index[va_ends[0]].isoformat(), frame.index[va_ends[-1]].isoformat()),
        )
        if self.quantile_calibration_.head_outside_band():
            self.n_quantile_head_off_ += 1
            logger.warning(
                "%s: quantile head breach rates on the validation block %s at levels %s are outside the "
                "99.9%% binomial band of %d origins", type(self).__name__,
                np.round(self.quantile_calibration_.rate_before, 4).tolist(), list(self.quantile_calibration_.levels),
                self.quantile_calibration_.n_origins,
            )
        self._filter(frame)

    # ------------------------------------------------------------------ state
    def _resid_z(self, frame: pd.DataFrame, probs: pd.DataFrame | None, first_target: int) -> np.ndarray:
        """One-step standardized returns of the bars at positions >= ``first_target`` of ``frame`` (NaN kept)."""
        raw, fs = self._feats(frame, probs)
        n = len(frame)
        ends = np.arange(max(first_target - 1, 0), n - 1)
        z = np.full(len(ends), np.nan)
        ok_ends = np.intersect1d(ends, _complete_ends(fs, int(self.lookback)))
        if len(ok_ends):
            out = predict_network(self.net_, self._windows_X(fs, ok_ends), self._base(raw, ok_ends))
            r = aligned_returns(frame)
            z[np.searchsorted(ends, ok_ends)] = r[ok_ends + 1] / np.sqrt(np.exp(out["log_var"][:, 0]))
        return z

    def _windows_X(self, fs: np.ndarray, ends: np.ndarray) -> np.ndarray:
        idx = ends[:, None] + np.arange(-int(self.lookback) + 1, 1)[None, :]
        return fs[idx].astype(np.float32)

    def _filter(self, frame: pd.DataFrame) -> None:
        probs = None
        if self.use_regimes:
            self.regime_.filter(frame)
            probs = self.regime_.regime_probabilities(frame)
        n, R = len(frame), int(self.resid_bars)
        start = max(0, n - R - self._buflen)
        sub = frame.iloc[start:]
        z = self._resid_z(sub, None if probs is None else probs.iloc[start:], max(len(sub) - R, 1))
        self.z_ = z[-R:]
        self.std_resid_ = self.z_[np.isfinite(self.z_)]
        self._f1_cache = None
        self.buf_ = frame[self.buffer_columns_].iloc[-self._buflen :].copy()
        self.buf_.attrs = {}
        self.pbuf_ = None if probs is None else probs.iloc[-self._buflen :].copy()

    def _update(self, new_bars: pd.DataFrame) -> None:
        missing = [c for c in self.buffer_columns_ if c not in new_bars.columns]
        if missing:
            raise ValueError(f"new_bars lacks columns {missing} used by {type(self).__name__}")
        pnew = self.regime_.update_probabilities(new_bars) if self.use_regimes else None
        buf = pd.concat([self.buf_, new_bars[self.buffer_columns_]])
        pbuf = None if pnew is None else pd.concat([self.pbuf_, pnew])
        cache = getattr(self, "_f1_cache", None)
        if len(new_bars) == 1 and cache is not None and cache[0] == self.last_time_:
            # the one-step forecast for this bar was already made by predict_variance at the last bar
            z = aligned_returns(new_bars) / np.sqrt(cache[1])
        else:
            z = self._resid_z(buf, pbuf, len(self.buf_))
        self._f1_cache = None
        self.z_ = np.concatenate([self.z_, z])[-int(self.resid_bars) :]
        self.std_resid_ = self.z_[np.isfinite(self.z_)]
        self.buf_ = buf.iloc[-self._buflen :]
        self.pbuf_ = None if pbuf is None else pbuf.iloc[-self._buflen :]

    # ------------------------------------------------------------------ forecast
    def _network_forecast(
        self, raw: np.ndarray, fs: np.ndarray, ends: np.ndarray, horizon: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Per-step variance ``(n, horizon)``, return quantiles ``(n, horizon, Q)``, raw network
        outputs and whether each window was complete, for windows ending at ``ends``."""
        X = self._windows_X(fs, ends)
        complete = np.all(np.isfinite(X), axis=(1, 2))
        X = np.nan_to_num(X, nan=0.0)  # missing inputs at their training mean
        raw_last = np.nan_to_num(raw, nan=float(np.log(VARIANCE_FLOOR)))
        out = predict_network(self.net_, X, self._base(raw_last, ends))
        lv = out["log_var"]
        steps = np.minimum(np.arange(horizon), lv.shape[1] - 1)
        var = np.maximum(np.exp(lv[:, steps]), VARIANCE_FLOOR)
        zq = out["z_quantiles"][:, steps, :]
        offset = getattr(self, "quantile_offset_", None)  # absent in models pickled before it existed
        zq = monotone_levels(zq if offset is None else zq + offset[steps])
        cal = getattr(self, "quantile_calibration_", None)
        if cal is not None:
            zq = cal.apply(zq)
        return var, np.sqrt(var)[:, :, None] * zq, out, complete

    def _quantile_meta(self, fc: VolatilityForecast) -> VolatilityForecast:
        cal = getattr(self, "quantile_calibration_", None)
        if cal is not None:
            fc.meta["quantile_calibration"] = {"method": cal.method, "scale": float(cal.scale), "shift": cal.shift.tolist()}
        return fc

    def _predict(self, horizon: int) -> VolatilityForecast:
        raw, fs = self._feats(self.buf_, self.pbuf_)
        end = np.array([len(fs) - 1])
        var, q, out, complete = self._network_forecast(raw, fs, end, horizon)
        self._f1_cache = (self.last_time_, float(np.exp(out["log_var"][0, 0]))) if complete[0] else None
        extra: dict[str, Any] = {
            "std_resid": self.std_resid_,
            "quantiles": q,
            "quantile_levels": tuple(float(x) for x in self.quantile_levels),
        }
        if self.pbuf_ is not None:
            p = self.pbuf_.to_numpy()[-1]
            if np.all(np.isfinite(p)):
                extra["regime_probs"] = (p / p.sum())[None, :]
                extra["regime_names"] = tuple(self.pbuf_.columns)
        fc = self._forecast(var[0], **extra)
        fc.meta["predicted_regime_probs"] = out["regime_probs"][0].tolist()
        return self._quantile_meta(fc)

    def predict_path(self, frame: pd.DataFrame, horizon: int = 1, *, start: Any = None) -> VolatilityForecast:
        """Forecasts from every bar of ``frame`` as an origin, with the fitted parameters (batched).

        Row ``i`` equals ``filter(frame.iloc[: j + 1]).predict_variance(horizon)`` for the origin at
        position ``j`` (the same as fitting on a prefix of ``frame`` and calling ``update`` bar by
        bar up to ``j``), computed in one pass; the model's state is left unchanged. Meant for
        out-of-sample evaluation over many origins.

        Parameters
        ----------
        frame : pd.DataFrame
            Feature frame from its first bar (the regime filter and the trailing HAR means start
            there), e.g. the fit window followed by the test bars.
        horizon : int
            Steps per origin.
        start : timestamp, optional
            First origin (UTC); default the first bar with a full ``lookback`` window.

        Returns
        -------
        VolatilityForecast
            Origins × ``horizon`` per-step variance with the return quantiles; regime
            probabilities when every origin has them. ``std_resid`` is not set (it is a property of
            one origin's trailing history).
        """
        self._check_fitted()
        if not isinstance(horizon, int | np.integer) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        frame = self._validate_frame(frame)
        probs = self.regime_.regime_probabilities(frame) if self.use_regimes else None
        raw, fs = self._feats(frame, probs)
        first = int(self.lookback) - 1
        if start is not None:
            first = max(first, int(frame.index.searchsorted(_utc(start), side="left")))
        if first >= len(frame):
            raise ValueError(
                f"start={start!r} leaves no origin in a frame of {len(frame)} bars with lookback={self.lookback}"
            )
        ends = np.arange(first, len(frame))
        var, q, _, _ = self._network_forecast(raw, fs, ends, int(horizon))
        extra: dict[str, Any] = {"quantiles": q, "quantile_levels": tuple(float(x) for x in self.quantile_levels)}
        if probs is not None:
            p = probs.to_numpy()[ends]
            if np.all(np.isfinite(p)):
                extra["regime_probs"] = p / p.sum(axis=1, keepdims=True)
                extra["regime_names"] = tuple(probs.columns)
        fc = VolatilityForecast(
            origins=frame.index[ends], variance=var, model=self.name, version=self.spec_hash(), **extra
        )
        return self._quantile_meta(fc)


@register
class TCNForecaster(NeuralForecaster):
    """Temporal convolutional network (causal dilated convolutions) variant of the neural forecaster."""

    name = "tcn"
    _arch = "tcn"


@register
class HybridForecaster(NeuralForecaster):
    """log-HAR forecast corrected in log space by a GRU (network output added to ``ln HAR``)."""

    name = "hybrid"
    _arch = "gru"
    _hybrid = True
