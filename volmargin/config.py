"""The configs of the CLI's jobs, composed from the settings each stage owns, and their YAML loader.

Every model forbids unknown keys (``extra="forbid"``), so a typo is reported with the key's name.
:func:`load_config` reads a YAML file and raises ``ValueError`` naming the file and the field path,
e.g. ``configs/train_btc.yaml: walk_forward.refit_evry: unknown key 'refit_evry'``.

Stage-owned sections: ``training.config`` (models, walk-forward, promotion, default cuts),
``margin.settings`` (controls), ``backtest.settings`` (population, backtest, policies, portfolio). This module adds
the executor, the regime switch and the sensitivity table, and composes :class:`TrainConfig`
(``volmargin train``) and :class:`RunConfig` (``volmargin run`` / ``volmargin backtest``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from backtest.settings import (
    BacktestSettings,
    LiquidationSection,
    PoliciesConfig,
    PopulationSettings,
    PortfolioSection,
    check_budgets,
)
from margin.settings import ControlsConfig
from training.config import (
    DEFAULT_CUTS,
    ModelSpec,
    PromotionConfig,
    StrictModel,
    TrainSettings,
    WalkForwardConfig,
)

__all__ = [
    "DEFAULT_CUTS",
    "StrictModel",
    "ModelSpec",
    "WalkForwardConfig",
    "PromotionConfig",
    "ExecutorConfig",
    "TrainConfig",
    "RunConfig",
    "ControlsConfig",
    "PoliciesConfig",
    "PopulationSettings",
    "BacktestSettings",
    "PortfolioSection",
    "CONFIG_KINDS",
    "load_config",
    "format_validation_error",
]


class ExecutorConfig(StrictModel):
    """Where (asset, model) tasks run: local processes or a Ray cluster at ``address``."""

    backend: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    address: str | None = None


class TrainConfig(TrainSettings):
    """Configuration of ``volmargin train``: :class:`training.config.TrainSettings` and where tasks run.

    Parameters
    ----------
    executor : ExecutorConfig
        Local processes (default, one worker) or a Ray cluster.
    """

    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)


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
    budgets : list of float
        Capital budgets: average collateral as a fraction of exposure (``avg_collateral`` of the backtest);
        every comparison is made at each (default 0.125, 0.15, 0.20, 0.25, 0.30).
    bad_debt_tolerance : float
        Bad debt (USD) a static pair may leave and still qualify as the best at a budget (default 0).
    training : RunTrainingConfig
        Walk-forward training of the forecasters (the champion at the cut drives the margin policies).
    regime : RegimeConfig
    policies : PoliciesConfig
    controls : ControlsConfig
    population : PopulationSettings
        Fields of ``backtest.population.PopulationConfig`` (``seed`` comes from ``seed``).
    backtest : BacktestSettings
        Fields of ``backtest.simulation.BacktestConfig`` (``liquidation``: ``margin.params.LiquidationSettings``).
    sensitivity : SensitivityConfig
    portfolio : PortfolioSection
        The portfolio-margin comparison on multi-instrument accounts (``dynamic_grid`` against the best static
        grid and the bound at each budget; default on, every daily asset sharing a cut, the run's budgets).
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
    budgets: list[float] = Field(default_factory=lambda: [0.125, 0.15, 0.20, 0.25, 0.30], min_length=1)
    bad_debt_tolerance: float = Field(default=0.0, ge=0)
    population: PopulationSettings = Field(default_factory=PopulationSettings)
    backtest: BacktestSettings = Field(default_factory=BacktestSettings)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    portfolio: PortfolioSection = Field(default_factory=PortfolioSection)
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

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        return check_budgets(v)

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
        _check_portfolio_assets(self)
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


def _check_margin_fields(cfg: RunConfig) -> None:
    """Dotted keys of ``sensitivity.vary`` name fields of the population or backtest sections."""
    known = {"population": set(PopulationSettings.model_fields), "backtest": set(BacktestSettings.model_fields)}
    liq = set(LiquidationSection.model_fields)
    for path, values in cfg.sensitivity.vary.items():
        section, _, key = path.partition(".")
        if section not in known or not key:
            raise ValueError(
                f"sensitivity.vary: key {path!r} must be 'population.<field>' or 'backtest.<field>'"
            )
        fields = known[section]
        head, _, sub = key.partition(".")
        if head not in fields:
            raise ValueError(f"sensitivity.vary: unknown field {head!r} of {section} (known: {', '.join(sorted(fields))})")
        if sub and (head != "liquidation" or sub not in liq):
            raise ValueError(f"sensitivity.vary: unknown field {sub!r} of backtest.liquidation (known: {', '.join(sorted(liq))})")
        if not values:
            raise ValueError(f"sensitivity.vary.{path}: give at least one value")


def _check_portfolio_assets(cfg: RunConfig) -> None:
    """``portfolio.assets`` are asset labels of ``datasets`` that share one cut."""
    names = cfg.portfolio.assets
    if names is None:
        return
    from data_pipelines.pipeline import asset_label

    labels: dict[str, str] = {}
    for ds in cfg.datasets:
        try:
            labels[asset_label(ds)] = ds
        except ValueError:
            continue
    unknown = [a for a in names if a not in labels]
    if unknown:
        raise ValueError(f"portfolio.assets: unknown asset(s) {unknown}; the run's assets are {sorted(labels)}")
    cuts = {a: cfg.cut_for(labels[a]) for a in names}
    if len(set(cuts.values())) > 1:
        raise ValueError(f"portfolio.assets must share one cut, got {', '.join(f'{a} {c}' for a, c in cuts.items())}")


CONFIG_KINDS["run"] = RunConfig
