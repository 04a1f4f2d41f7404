"""Pydantic models of the training stage's settings: models to train, the walk-forward schedule, promotion.

Every model forbids unknown keys (``extra="forbid"``), so a typo is reported with the key's name.
``volmargin.config`` composes these into the configs of ``volmargin train`` and ``volmargin run``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_CUTS",
    "StrictModel",
    "ModelSpec",
    "WalkForwardConfig",
    "PromotionConfig",
    "TrainSettings",
]

#: Default cut date per dataset: folds before it choose the model, folds after it are the held-out test.
DEFAULT_CUTS: dict[str, dt.date] = {
    "bundled:bitstamp/BTC": dt.date(2018, 1, 1),
    "bundled:coinbase-pro/ETH": dt.date(2018, 1, 1),
    "bundled:coinbase-pro/LTC": dt.date(2018, 1, 1),
    "bundled:tsd/BTC-1d": dt.date(2021, 1, 1),
    "bundled:tsd/BTC-15m": dt.date(2021, 11, 15),
}


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """One forecaster to train: a registered model ``name`` with keyword ``params``.

    ``label`` distinguishes two specifications of one model (e.g. ``garch`` with normal and with t
    errors); it defaults to ``name`` and must be unique within a config. ``refit_every`` overrides the
    walk-forward schedule's for this model (e.g. a neural network refitted yearly, GARCH monthly).
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    refit_every: int | None = Field(default=None, ge=1)

    @property
    def key(self) -> str:
        """Identifier of this specification in results (``label`` or ``name``)."""
        return self.label or self.name


class WalkForwardConfig(StrictModel):
    """Walk-forward schedule, all lengths in bars.

    Parameters
    ----------
    min_train : int
        Bars in the first training window; the first forecast origin is bar ``min_train - 1``.
    window : {"expanding", "rolling"}
        Training window type.
    window_size : int, optional
        Length of the rolling window (default ``min_train``); only with ``window: rolling``.
    refit_every : int
        Bars between parameter re-estimations; between refits the model only filters new bars (``update``).
    test_block : int, optional
        Origins per fold (default ``refit_every``); folds are also split at the cut.
    purge : int
        Bars dropped from the end of each training window before fitting (they are filtered, not fitted).
    embargo : int
        Origins right after the cut left out of the held-out score.
    """

    min_train: int = Field(default=500, ge=20)
    window: Literal["expanding", "rolling"] = "expanding"
    window_size: int | None = Field(default=None, ge=20)
    refit_every: int = Field(default=20, ge=1)
    test_block: int | None = Field(default=None, ge=1)
    purge: int = Field(default=0, ge=0)
    embargo: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> WalkForwardConfig:
        if self.window_size is not None and self.window != "rolling":
            raise ValueError("window_size is only used with window: rolling")
        if self.purge >= self.min_train:
            raise ValueError(f"purge must be < min_train ({self.min_train}), got {self.purge}")
        return self

    @property
    def block(self) -> int:
        """Origins per fold."""
        return self.test_block or self.refit_every

    @property
    def rolling_size(self) -> int:
        """Rolling window length in bars."""
        return self.window_size or self.min_train


class PromotionConfig(StrictModel):
    """Promotion gate of the registry (pre-cut folds only).

    Parameters
    ----------
    register_models : bool
        Register models and move aliases; false evaluates without touching the registry.
    dm_alpha : float
        A challenger must beat the champion with a one-sided Diebold-Mariano p-value below this.
    mcs_size : float
        Size of Hansen's model confidence set (the set holds the best model with prob. ``1 - size``).
    mcs_reps : int
        Bootstrap replications of the MCS.
    max_traffic_light : {"green", "yellow"}
        Worst acceptable Basel zone of the 99% VaR exceptions (pre-cut).
    spa_reps : int
        Bootstrap replications of Hansen's SPA test that a configuration found by a search (``volmargin hpo``)
        must also pass, below ``dm_alpha``, against the champion.
    """

    register_models: bool = True
    dm_alpha: float = Field(default=0.05, gt=0, lt=1)
    mcs_size: float = Field(default=0.10, gt=0, lt=1)
    mcs_reps: int = Field(default=1000, ge=10)
    spa_reps: int = Field(default=1000, ge=10)
    max_traffic_light: Literal["green", "yellow"] = "yellow"


class TrainSettings(StrictModel):
    """Settings of walk-forward training and evaluation (``volmargin train`` adds where the tasks run).

    Parameters
    ----------
    name : str
        Experiment name in MLflow (one experiment per training config).
    seed : int
        Seed for every random choice (neural training, MCS bootstrap).
    datasets : list of str
        Dataset ids (``bundled:bitstamp/BTC`` ...).
    cut : date, optional
        Model selection uses folds before it; default per dataset (:data:`DEFAULT_CUTS`).
    horizon : int
        Forecast steps ``H`` (bars).
    proxy : {"gk", "sq", "rv"}
        Scoring target (Garman-Klass by default).
    var_levels : list of float
        VaR confidence levels for the coverage tests.
    baselines : list of str, optional
        Model keys every model is compared with by Diebold-Mariano (default: every other model).
    tracking_uri : str, optional
        MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``.
    allow_file_store : bool
        Accept a plain file-store tracking URI (refused by default: it is deprecated and not concurrent).
    artifacts_dir : str
        Root of written artifacts (``<artifacts_dir>/train/<run id>/``).
    """

    name: str = Field(min_length=1)
    seed: int = 0
    datasets: list[str] = Field(min_length=1)
    cut: dt.date | None = None
    horizon: int = Field(default=1, ge=1, le=250)
    walk_forward: WalkForwardConfig = Field(default_factory=WalkForwardConfig)
    models: list[ModelSpec] = Field(min_length=1)
    proxy: Literal["gk", "sq", "rv"] = "gk"
    var_levels: list[float] = Field(default_factory=lambda: [0.95, 0.99])
    baselines: list[str] | None = None
    tracking_uri: str | None = None
    allow_file_store: bool = False
    artifacts_dir: str = "artifacts"
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @field_validator("var_levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        for lv in v:
            if not 0.5 < lv < 1:
                raise ValueError(f"VaR level must be in (0.5, 1), got {lv}")
        return v

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"datasets must be unique, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        keys = [m.key for m in self.models]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"model keys must be unique (set 'label' to tell specs apart), duplicated: {dup}")
        if self.baselines is not None:
            unknown = [b for b in self.baselines if b not in keys]
            if unknown:
                raise ValueError(f"baselines {unknown} are not model keys; known: {keys}")
        if self.cut is None:
            missing = [d for d in self.datasets if d not in DEFAULT_CUTS]
            if missing:
                raise ValueError(f"no default cut for datasets {missing}; set 'cut' (a date)")
        return self

    def cut_for(self, dataset: str) -> dt.date:
        """Cut date for ``dataset`` (the config's ``cut`` or the dataset default)."""
        if self.cut is not None:
            return self.cut
        if dataset not in DEFAULT_CUTS:
            raise ValueError(f"no default cut for dataset {dataset!r}; set 'cut' in the config")
        return DEFAULT_CUTS[dataset]

    def baselines_for(self, key: str) -> list[str]:
        """Model keys that ``key`` is compared with by Diebold-Mariano."""
        base = self.baselines if self.baselines is not None else [m.key for m in self.models]
        return [b for b in base if b != key]
