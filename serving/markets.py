"""``configs/markets.yaml``: the markets the feed publishes and how each one is computed.

Each market id (``BTC-PERP``) names its input data set, instrument kind and underlying, the registered model
(name and alias or version; with ``fit`` the specification fitted on the market's own bars, and cached, when
the registry has no such model), the margin policy (and where its fitted parameters come from), the change
controls, the failsafe settings and the base parameters (fees, haircuts, liquidation settings, tiers, the
dynamic scenario grid). Errors name the field and value: ``markets.BTC-PERP.controls.max_change: ...``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.failsafe import UpdateRules

__all__ = [
    "parse_duration",
    "ModelRef",
    "PredictiveFitCfg",
    "PolicyRef",
    "ControlsCfg",
    "FailsafeCfg",
    "GridCfg",
    "TierCfg",
    "MarketCfg",
    "FeedCfg",
    "MarketsFile",
    "load_markets",
    "DEFAULT_MARKETS_PATH",
]

DEFAULT_MARKETS_PATH = Path("configs/markets.yaml")
_DUR = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
INSTRUMENT_KINDS = ("linear_perp", "inverse_perp", "future", "inverse_future", "option")


def parse_duration(value: Any, name: str = "duration") -> int:
    """Seconds in ``"90s"``, ``"15m"``, ``"1h"``, ``"3d"``, ``"1w"`` or a plain integer of seconds.

    Raises
    ------
    ValueError
        Naming ``name`` and the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a duration like '15m', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return value
    m = _DUR.match(str(value))
    if not m:
        raise ValueError(f"{name} must be a duration like '90s', '15m', '1h' or '3d', got {value!r}")
    return int(m.group(1)) * _UNIT[m.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """The registered model behind a market: ``name`` with ``alias`` or ``version``.

    ``fit`` (``{name, params}``, a ``models`` forecaster) is fitted on the market's bars and cached when the
    registry has no such model (a fresh clone); ``horizon`` forecast steps; ``window`` forecast rows behind
    each publish (the policy's residuals come from them).
    """

    name: str
    alias: str | None = "champion"
    version: str | None = None
    fit: dict[str, Any] | None = None
    horizon: int = Field(5, ge=1, le=60)
    window: int = Field(250, ge=30, le=5000)

    @model_validator(mode="after")
    def _one_ref(self) -> ModelRef:
        if self.version is not None and self.alias not in (None, "champion"):
            raise ValueError(f"give alias or version, not both (alias={self.alias!r}, version={self.version!r})")
        if self.fit is not None:
            if "name" not in self.fit:
                raise ValueError(f"fit needs a model name ({{name: garch, params: {{}}}}), got {self.fit!r}")
            extra = set(self.fit) - {"name", "params"}
            if extra:
                raise ValueError(f"fit: unknown key(s) {sorted(extra)}; known: ['name', 'params']")
        return self


class PredictiveFitCfg(_Strict):
    """How a ``predictive`` market fits its parameters when it has none (a fresh clone), with
    :func:`backtest.fit.fit_predictive` on the ``bars`` bars before the publish window (the cut), forecast
    out of sample by the market's model, for a population of ``positions`` positions (``population``: more
    ``backtest.population.PopulationConfig`` fields), over ``grid`` (defaults: a reduced grid, see
    :data:`serving.predictive.FIT_GRID`) in ``rounds`` coordinate passes (``refine``: a finer look at level
    and power). The fit is cached and reused while its cut is less than ``refit_every`` before the
    current one and the bars before it are unchanged."""

    bars: int = Field(730, ge=60, le=20_000)
    positions: int = Field(2000, ge=100, le=200_000)
    seed: int = 0
    rounds: int = Field(1, ge=1, le=5)
    refine: bool = False
    grid: dict[str, tuple[float | str, ...]] | None = None
    weights: dict[str, float] | None = None
    population: dict[str, Any] = Field(default_factory=dict)
    refit_every: int | str = "30d"

    @model_validator(mode="after")
    def _check(self) -> PredictiveFitCfg:
        parse_duration(self.refit_every, "refit_every")
        known = {"level", "power", "stress", "omega", "floor", "release", "mm_binds", "mm_k", "mm_floor", "mm_fraction"}
        bad = set(self.grid or {}) - known
        if bad:
            raise ValueError(f"grid: unknown parameter(s) {sorted(bad)}; known: {sorted(known)}")
        if any(len(v) == 0 for v in (self.grid or {}).values()):
            raise ValueError(f"grid: every parameter needs at least one value, got {self.grid!r}")
        bad = set(self.weights or {}) - {"alpha", "beta", "capital_cost_annual"}
        if bad:
            raise ValueError(f"weights: unknown key(s) {sorted(bad)}; known: alpha, beta, capital_cost_annual")
        return self


class PolicyRef(_Strict):
    """The margin policy: ``name`` (``ewma_ccp``, ``garch_fhs``, ``predictive``, ``static_<im>``) and ``params``.

    ``predictive`` gets its fitted parameters from ``fitted_from`` (a run directory with the ``details.json``
    of ``volmargin run``, or an MLflow run ``runs:/<run id>``; ``params`` override them), or inline in
    ``params`` (at least ``level`` and ``power``), or else from a fit on the market's own bars before the
    publish window (``fit``: its settings; ``params`` given are held fixed), cached for the next publish.
    """

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    fitted_from: str | None = None
    fit: PredictiveFitCfg | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in ("ewma_ccp", "garch_fhs", "predictive") or v.startswith("static_"):
            return v
        raise ValueError(f"must be ewma_ccp, garch_fhs, predictive or static_<im>, got {v!r}")

    @model_validator(mode="after")
    def _predictive_only(self) -> PolicyRef:
        if self.name != "predictive" and (self.fit is not None or self.fitted_from is not None):
            raise ValueError(f"fit and fitted_from are for the predictive policy, not {self.name!r}")
        if self.fit is not None and self.fitted_from is not None:
            raise ValueError(f"give fit or fitted_from, not both (fitted_from={self.fitted_from!r})")
        return self


class ControlsCfg(_Strict):
    floor: float = 0.02
    ceiling: float = 0.5
    max_change: float = 0.25
    notice: int | str = "1h"
    min_interval: int | str = "1m"
    mm_fraction: float = 0.5


class FailsafeCfg(_Strict):
    """``static_im``: the static policy's IM (never published less); ``buffer`` over the last good IM;
    ``max_input_age``: input staler than this (last bar older than the as-of time) triggers the fallback
    (null: not checked, for historical sets); ``sanity``: bounds of a believable raw IM."""

    static_im: float = 0.10
    buffer: float = 0.25
    max_input_age: int | str | None = None
    sanity: tuple[float, float] = (1e-4, 1.0)


class GridCfg(_Strict):
    """Dynamic scenario grid. ``source: forecast`` (default): ``points`` spot shocks spanning ``± sigmas × σ_h`` of
    the market's forecast (σ_h over ``horizon`` steps), with ``vol_shocks``. ``source: dynamic_grid``: the grid the
    fitted ``dynamic_grid`` policy of a run set for this underlying at the market's last bar, read from
    ``params_from`` (a run directory holding ``portfolio_grid.json``, or that file; written by ``volmargin run``)."""

    dynamic: bool = True
    source: Literal["forecast", "dynamic_grid"] = "forecast"
    params_from: str | None = None
    sigmas: float = Field(4.0, gt=0, le=20)
    points: int = Field(11, ge=3, le=101)
    vol_shocks: tuple[float, ...] = (-0.25, 0.0, 0.25)
    min_shock: float = Field(0.02, gt=0, lt=1)
    max_shock: float = Field(0.9, gt=0, lt=1)

    @model_validator(mode="after")
    def _source_needs_a_run(self) -> GridCfg:
        if self.source == "dynamic_grid" and not self.params_from:
            raise ValueError("source dynamic_grid needs params_from (a run directory with portfolio_grid.json)")
        return self


class TierCfg(_Strict):
    """A risk tier: rates = the policy's rates × ``multiplier`` while notional <= ``max_notional``."""

    max_notional: float | None
    multiplier: float = Field(ge=1.0, le=20.0)


class MarketCfg(_Strict):
    """One market of the feed (see the module docstring)."""

    input: str
    instrument: Literal["linear_perp", "inverse_perp", "future", "inverse_future", "option"] = "linear_perp"
    underlying: str
    model: ModelRef
    policy: PolicyRef
    controls: ControlsCfg = Field(default_factory=ControlsCfg)
    failsafe: FailsafeCfg = Field(default_factory=FailsafeCfg)
    valid_for: int | str = "26h"
    params: dict[str, Any] = Field(default_factory=dict)
    tiers: tuple[TierCfg, ...] = ()
    scenario_grid: GridCfg | None = None

    @model_validator(mode="after")
    def _check(self) -> MarketCfg:
        parse_duration(self.valid_for, "valid_for")
        bad = {"market_id", "im_rate", "mm_rate", "tiers", "mm_rate_pending", "mm_effective_from", "valid_from",
               "valid_until"} & set(self.params)
        if bad:
            raise ValueError(f"params must not set {sorted(bad)}: the feed computes them")
        if self.tiers:
            caps = [t.max_notional for t in self.tiers]
            if caps[-1] is not None:
                raise ValueError(f"tiers: the last tier must be unbounded (max_notional null), got {caps[-1]}")
            mult = [t.multiplier for t in self.tiers]
            if mult[0] != 1.0 or mult != sorted(mult):
                raise ValueError(f"tiers: multipliers must start at 1.0 and not fall, got {mult}")
        self.rules()  # range checks with the field names
        return self

    def rules(self) -> UpdateRules:
        """The :class:`serving.failsafe.UpdateRules` of this market."""
        c, f = self.controls, self.failsafe
        return UpdateRules(
            floor=c.floor, ceiling=c.ceiling, max_change=c.max_change,
            notice_s=parse_duration(c.notice, "controls.notice"),
            min_interval_s=parse_duration(c.min_interval, "controls.min_interval"),
            mm_fraction=c.mm_fraction, static_im=f.static_im, fallback_buffer=f.buffer,
            sanity_min=f.sanity[0], sanity_max=f.sanity[1],
        )

    @property
    def valid_for_s(self) -> int:
        return parse_duration(self.valid_for, "valid_for")

    @property
    def max_input_age_s(self) -> int | None:
        a = self.failsafe.max_input_age
        return None if a is None else parse_duration(a, "failsafe.max_input_age")


class FeedCfg(_Strict):
    """Feed-wide settings: the EIP-712 domain, the store and the caches."""

    chain_id: int = Field(1, gt=0)
    verifying_contract: str = "0x0000000000000000000000000000000000000000"
    db: str = "artifacts/feed.db"
    cache_dir: str = "artifacts/serving"
    artifacts_dir: str = "artifacts"
    tracking_uri: str | None = None


class MarketsFile(_Strict):
    feed: FeedCfg = Field(default_factory=FeedCfg)
    markets: dict[str, MarketCfg]

    @field_validator("markets")
    @classmethod
    def _ids(cls, v: dict[str, MarketCfg]) -> dict[str, MarketCfg]:
        if not v:
            raise ValueError("at least one market is required")
        for k in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", k):
                raise ValueError(f"market id must be letters, digits, '.', '_' or '-' (<= 64), got {k!r}")
        return v

    def market(self, market_id: str) -> MarketCfg:
        """The market's config (``KeyError`` naming the known markets)."""
        if market_id not in self.markets:
            raise KeyError(f"unknown market {market_id!r}; configured: {', '.join(sorted(self.markets))}")
        return self.markets[market_id]

    def config_hash(self, market_id: str) -> str:
        """SHA-256 of the canonical JSON of the feed section and the market's section (lineage)."""
        blob = json.dumps({"feed": self.feed.model_dump(mode="json"),
                           "market": self.market(market_id).model_dump(mode="json")},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def domain(self) -> Any:
        from serving.feed import FeedDomain

        return FeedDomain(chain_id=self.feed.chain_id, verifying_contract=self.feed.verifying_contract)


def _pydantic_message(exc: ValidationError, path: str) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg} (got {json.dumps(e.get('input'), default=str)[:80]})")
    return f"{path}: " + "; ".join(parts)


def load_markets(path: str | Path | Mapping[str, Any] = DEFAULT_MARKETS_PATH) -> MarketsFile:
    """Read and validate a markets file (or an already-parsed mapping).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Invalid YAML or an invalid field, named with its path and value.
    """
    if isinstance(path, Mapping):
        doc: Any = dict(path)
        where = "markets config"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"markets file not found: {p}")
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: invalid YAML: {exc}") from None
        where = str(p)
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: must be a mapping with 'markets', got {type(doc).__name__}")
    try:
        return MarketsFile.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(_pydantic_message(exc, where)) from None
