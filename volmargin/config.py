"""Pydantic models of the YAML configs (``configs/*.yaml``).

Every model forbids unknown keys (``extra="forbid"``), so a typo is reported with the key's name.
:func:`load_config` reads a YAML file and raises ``ValueError`` naming the file and the field path,
e.g. ``configs/train_btc.yaml: walk_forward.refit_evry: unknown key 'refit_evry'``.

``TrainConfig`` configures ``volmargin train`` (walk-forward training and evaluation). The run/backtest
config of the end-to-end job is a separate model that another part of the project adds; register it
in ``CONFIG_KINDS`` so :func:`load_config` can load it by kind.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_CUTS",
    "StrictModel",
    "ModelSpec",
    "WalkForwardConfig",
    "PromotionConfig",
    "ExecutorConfig",
    "TrainConfig",
    "CONFIG_KINDS",
    "load_config",
    "format_validation_error",
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
    """

    register_models: bool = True
    dm_alpha: float = Field(default=0.05, gt=0, lt=1)
    mcs_size: float = Field(default=0.10, gt=0, lt=1)
    mcs_reps: int = Field(default=1000, ge=10)
    max_traffic_light: Literal["green", "yellow"] = "yellow"


class ExecutorConfig(StrictModel):
    """Where (asset, model) tasks run: local processes or a Ray cluster at ``address``."""

    backend: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    address: str | None = None


class TrainConfig(StrictModel):
    """Configuration of ``volmargin train``.

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
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

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
    def _check(self) -> TrainConfig:
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


#: Config kinds loadable by name (another issue adds "run").
CONFIG_KINDS: dict[str, type[StrictModel]] = {"train": TrainConfig}


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per error: ``<source>: <field.path>: <message>`` (unknown keys named)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {str(err['loc'][-1])!r}"
        elif err["type"] == "missing":
            msg = "required key missing"
        else:
            msg = err["msg"]
            if "input" in err and err["type"] not in ("value_error", "assertion_error"):
                msg += f" (got {err['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path, kind: str | type[StrictModel] = "train") -> Any:
    """Read and validate a YAML config.

    Parameters
    ----------
    path : str or Path
        YAML file.
    kind : str or model class
        ``"train"`` (default) or a key of :data:`CONFIG_KINDS`, or a :class:`StrictModel` subclass.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        YAML syntax error, non-mapping document, or validation error (message names the file and the
        field path, and an unknown key by name).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    if isinstance(kind, str):
        if kind not in CONFIG_KINDS:
            raise ValueError(f"config kind must be one of {sorted(CONFIG_KINDS)}, got {kind!r}")
        model = CONFIG_KINDS[kind]
    else:
        model = kind
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the config must be a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, str(p))) from None


# ============================================================================ run / backtest configs
# Section owned by the job layer (volmargin/run.py): configuration of ``volmargin run`` and
# ``volmargin backtest`` (configs/demo.yaml, configs/full.yaml). Kept apart from TrainConfig above.

#: Default datasets of the end-to-end job (the three crypto daily sets).
DEFAULT_RUN_DATASETS: tuple[str, ...] = (
    "bundled:bitstamp/BTC",
    "bundled:coinbase-pro/ETH",
    "bundled:coinbase-pro/LTC",
)


def _default_run_models() -> list[ModelSpec]:
    return [ModelSpec(name="ewma"), ModelSpec(name="garch"), ModelSpec(name="har")]


class RunTrainingConfig(StrictModel):
    """Walk-forward training inside the end-to-end job (the pieces of :class:`TrainConfig` it reuses).

    The job builds one ``TrainConfig`` per distinct cut from this section (name ``<run name>-train``),
    so the champion pinned at each cut is chosen exactly as ``volmargin train`` would choose it.
    """

    horizon: int = Field(default=5, ge=1, le=250)
    proxy: Literal["gk", "sq", "rv"] = "gk"
    var_levels: list[float] = Field(default_factory=lambda: [0.95, 0.99])
    walk_forward: WalkForwardConfig = Field(default_factory=lambda: WalkForwardConfig(min_train=300, refit_every=20))
    models: list[ModelSpec] = Field(default_factory=_default_run_models, min_length=1)
    baselines: list[str] | None = None
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)


class RegimeConfig(StrictModel):
    """Regime model (``models/regime.py``) whose filtered probabilities feed the predictive policy.

    It is fitted on bars before the cut only; probabilities after the cut use the frozen parameters
    and a forward filter (no look-ahead).
    """

    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=lambda: {"n_regimes": 3})


class PredictiveObjective(StrictModel):
    """Objective of the predictive optimizer: ``bad_debt + alpha * liquidations + beta * collateral_locked``.

    Parameters
    ----------
    alpha : float, optional
        Cost of one liquidation in quote currency (default in ``margin.policies.fit_predictive``: 1% of
        the population's median notional).
    beta : float, optional
        Cost of one unit of collateral locked for one bar (quote currency per quote-currency·bar).
    capital_cost_annual : float, optional
        Alternative to ``beta``: annual cost of capital as a fraction (default 0.10), converted per bar.
    """

    alpha: float | None = Field(default=None, ge=0)
    beta: float | None = Field(default=None, ge=0)
    capital_cost_annual: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_cost(self) -> PredictiveObjective:
        if self.beta is not None and self.capital_cost_annual is not None:
            raise ValueError("give either objective.beta or objective.capital_cost_annual, not both")
        return self

    def weights(self) -> dict[str, float]:
        """The weights that are set (``fit_predictive`` fills in the rest)."""
        return {k: float(v) for k, v in self.model_dump().items() if v is not None}


class PoliciesConfig(StrictModel):
    """Policies run by the job and their settings (passed to ``margin.policies.make_policy``).

    Parameters
    ----------
    static_levels : list of float
        IM rates of the ``static_<im>`` policies; also the bound's IM grid unless ``bound.grid`` is set.
    ewma_ccp, garch_fhs, oracle_vol, bound : dict
        Keyword settings of each policy (e.g. ``ewma_ccp: {tool: buffer}``; ``garch_fhs:
        {confidence: 0.99, horizon: 2}``); checked against ``make_policy`` when the job starts.
    predictive : dict
        Keyword settings of ``fit_predictive`` besides the objective weights.
    objective : PredictiveObjective
        Weights ``alpha`` and ``beta`` of the predictive objective.
    frontier_scales : list of float
        Multipliers applied to each adaptive family's margin to trace its frontier.
    """

    static_levels: list[float] = Field(
        default_factory=lambda: [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.50],
        min_length=2,
    )
    ewma_ccp: dict[str, Any] = Field(default_factory=dict)
    garch_fhs: dict[str, Any] = Field(default_factory=dict)
    predictive: dict[str, Any] = Field(default_factory=dict)
    objective: PredictiveObjective = Field(default_factory=PredictiveObjective)
    oracle_vol: dict[str, Any] = Field(default_factory=dict)
    bound: dict[str, Any] = Field(default_factory=dict)
    frontier_scales: list[float] = Field(default_factory=lambda: [0.6, 0.8, 1.0, 1.25, 1.6])

    @field_validator("static_levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        for lv in v:
            if not 0 < lv <= 1:
                raise ValueError(f"static level (IM rate) must be in (0, 1], got {lv}")
        if len(set(v)) != len(v):
            raise ValueError(f"static_levels must be unique, got {v}")
        return sorted(v)

    @field_validator("frontier_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        for s in v:
            if not s > 0:
                raise ValueError(f"frontier scale must be > 0, got {s}")
        return sorted(set(v))


class ControlsConfig(StrictModel):
    """Controls applied to every deployable policy (``margin.controls.Controls``).

    Parameters
    ----------
    floor, ceiling : float
        Bounds of the IM rate (fractions of notional).
    max_change : float
        Largest relative IM change per update (0.25 = 25%).
    notice_bars : int
        Bars before an MM increase binds on open positions (new positions get the higher IM at once).
    mm_fraction : float
        MM = mm_fraction × IM.
    """

    floor: float = Field(default=0.02, gt=0, le=1)
    ceiling: float = Field(default=0.5, gt=0, le=1)
    max_change: float = Field(default=0.5, gt=0)
    notice_bars: int = Field(default=1, ge=0)
    mm_fraction: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> ControlsConfig:
        if self.floor > self.ceiling:
            raise ValueError(f"controls.floor ({self.floor}) must be <= controls.ceiling ({self.ceiling})")
        return self


class SensitivityConfig(StrictModel):
    """Which assumptions the sensitivity table varies (one at a time, everything else at the base).

    ``vary`` maps a dotted field of the ``population`` or ``backtest`` section (e.g.
    ``population.leverage_median``, ``population.topup_prob``, ``backtest.slippage_vol``) to the values
    tried. ``assets`` restricts the table to some asset labels (default: the first dataset).
    """

    enabled: bool = True
    vary: dict[str, list[float]] = Field(default_factory=dict)
    assets: list[str] | None = None


class RunConfig(StrictModel):
    """Configuration of ``volmargin run`` and ``volmargin backtest`` (configs/demo.yaml, configs/full.yaml).

    Parameters
    ----------
    name : str
        MLflow experiment of the job (one parent run per job).
    seed : int
        Seed of every random choice (population, training, MCS bootstrap).
    datasets : list of str
        Dataset ids; default the three crypto daily sets.
    cuts : dict, optional
        Cut date per dataset id; default :data:`DEFAULT_CUTS` (2018-01-01 for the daily sets,
        2021-11-15 for ``bundled:tsd/BTC-15m``). Policies are fitted before it and scored after it.
    training : RunTrainingConfig
        Walk-forward training of the forecasters (the champion at the cut drives the margin policies).
    regime : RegimeConfig
    policies : PoliciesConfig
    controls : ControlsConfig
    population : dict
        Fields of ``margin.population.PopulationConfig`` (``seed`` comes from ``seed``).
    backtest : dict
        Fields of ``margin.backtest.BacktestConfig``.
    sensitivity : SensitivityConfig
    forecasts_dir : str, optional
        ``volmargin backtest`` only: a folder of saved walk-forward tables
        (``<asset label>.parquet`` or ``<asset label>/<model>.parquet``) used instead of the pinned
        champion's; when absent, the backtest reads the pinned champions and recomputes the EWMA baseline
        if no champion was recorded.
    tracking_uri : str, optional
        MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``.
    artifacts_dir : str
        Root of the training artifacts and of the registry records.
    """

    name: str = Field(default="volmargin-run", min_length=1)
    seed: int = 0
    datasets: list[str] = Field(default_factory=lambda: list(DEFAULT_RUN_DATASETS), min_length=1)
    cuts: dict[str, dt.date] = Field(default_factory=dict)
    training: RunTrainingConfig = Field(default_factory=RunTrainingConfig)
    regime: RegimeConfig = Field(default_factory=RegimeConfig)
    policies: PoliciesConfig = Field(default_factory=PoliciesConfig)
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    population: dict[str, Any] = Field(default_factory=dict)
    backtest: dict[str, Any] = Field(default_factory=dict)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    forecasts_dir: str | None = None
    tracking_uri: str | None = None
    allow_file_store: bool = False
    artifacts_dir: str = "artifacts"

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"datasets must be unique, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        extra = [d for d in self.cuts if d not in self.datasets]
        if extra:
            raise ValueError(f"cuts names datasets that are not in 'datasets': {extra}")
        missing = [d for d in self.datasets if d not in self.cuts and d not in DEFAULT_CUTS]
        if missing:
            raise ValueError(f"no default cut for datasets {missing}; set cuts.<dataset> (a date)")
        keys = [m.key for m in self.training.models]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"training.models keys must be unique (set 'label'), duplicated: {dup}")
        if self.training.baselines is not None:
            unknown = [b for b in self.training.baselines if b not in keys]
            if unknown:
                raise ValueError(f"training.baselines {unknown} are not model keys; known: {keys}")
        _check_margin_fields(self)
        return self

    def cut_for(self, dataset: str) -> dt.date:
        """Cut date of ``dataset`` (``cuts`` entry or the dataset default)."""
        if dataset in self.cuts:
            return self.cuts[dataset]
        if dataset not in DEFAULT_CUTS:
            raise ValueError(f"no default cut for dataset {dataset!r}; set cuts.{dataset}")
        return DEFAULT_CUTS[dataset]

    def train_config(self, datasets: list[str], cut: dt.date) -> TrainConfig:
        """The ``TrainConfig`` of the training step for ``datasets`` sharing one ``cut``."""
        t = self.training
        return TrainConfig(
            name=f"{self.name}-train",
            seed=self.seed,
            datasets=datasets,
            cut=cut,
            horizon=t.horizon,
            walk_forward=t.walk_forward,
            models=t.models,
            proxy=t.proxy,
            var_levels=t.var_levels,
            baselines=t.baselines,
            tracking_uri=self.tracking_uri,
            allow_file_store=self.allow_file_store,
            artifacts_dir=self.artifacts_dir,
            promotion=t.promotion,
            executor=t.executor,
        )


def _dataclass_fields(module: str, cls: str) -> set[str] | None:
    """Field names of a margin dataclass, or None when the module is not importable."""
    import dataclasses
    import importlib

    try:
        obj = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    return {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else None


def _check_margin_fields(cfg: RunConfig) -> None:
    """Unknown keys of the pass-through sections (population, backtest, sensitivity.vary) are errors."""
    known = {
        "population": _dataclass_fields("margin.population", "PopulationConfig"),
        "backtest": _dataclass_fields("margin.backtest", "BacktestConfig"),
    }
    for section in ("population", "backtest"):
        fields = known[section]
        if fields is None:
            continue
        for key in getattr(cfg, section):
            if key not in fields or key == "seed":
                raise ValueError(f"{section}: unknown key {key!r} (known: {', '.join(sorted(fields - {'seed'}))})")
    liq = _dataclass_fields("margin.params", "LiquidationSettings")
    liq_d = cfg.backtest.get("liquidation")
    if liq is not None and known["backtest"] is not None and liq_d is not None:
        if not isinstance(liq_d, dict):
            raise ValueError(f"backtest.liquidation must be a mapping of LiquidationSettings fields, got {liq_d!r}")
        for key in liq_d:
            if key not in liq:
                raise ValueError(f"backtest.liquidation: unknown key {key!r} (known: {', '.join(sorted(liq))})")
    for path, values in cfg.sensitivity.vary.items():
        section, _, key = path.partition(".")
        if section not in known or not key:
            raise ValueError(
                f"sensitivity.vary: key {path!r} must be 'population.<field>' or 'backtest.<field>'"
            )
        fields = known[section]
        head, _, sub = key.partition(".")
        if fields is not None and head not in fields:
            raise ValueError(f"sensitivity.vary: unknown field {head!r} of {section} (known: {', '.join(sorted(fields))})")
        if sub and head == "liquidation" and liq is not None and sub not in liq:
            raise ValueError(f"sensitivity.vary: unknown field {sub!r} of backtest.liquidation (known: {', '.join(sorted(liq))})")
        if not values:
            raise ValueError(f"sensitivity.vary.{path}: give at least one value")


CONFIG_KINDS["run"] = RunConfig
