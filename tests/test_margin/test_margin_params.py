"""MarginParams: validation messages, tiers, pending MM, JSON round trip."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from margin.params import (
    CollateralHaircuts,
    LiquidationSettings,
    MarginParams,
    ParamsFile,
    RiskModel,
    RiskTier,
    ScenarioGrid,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class TestValidation:
    def test_flat_rates(self):
        p = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05)
        assert p.tiers == (RiskTier(max_notional=math.inf, im_rate=0.1, mm_rate=0.05),)

    @pytest.mark.parametrize("bad", [0.0, -0.1, 1.7, float("nan"), float("inf")])
    def test_im_rate_range(self, bad):
        with pytest.raises(ValueError, match=r"im_rate must be"):
            MarginParams(market_id="BTC", im_rate=bad, mm_rate=0.05)

    def test_message_names_value(self):
        with pytest.raises(ValueError, match=r"im_rate must be in \(0, 1\], got 1.7"):
            MarginParams(market_id="BTC", im_rate=1.7, mm_rate=0.05)

    def test_mm_above_im(self):
        with pytest.raises(ValueError, match="mm_rate must not exceed im_rate"):
            MarginParams(market_id="BTC", im_rate=0.05, mm_rate=0.1)

    def test_non_numeric(self):
        with pytest.raises(ValueError, match="im_rate must be a number, got '0.1'"):
            MarginParams(market_id="BTC", im_rate="0.1", mm_rate=0.05)

    def test_tiers_and_flat_exclusive(self):
        with pytest.raises(ValueError, match="either im_rate/mm_rate or tiers"):
            MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05, tiers=(RiskTier(math.inf, 0.1, 0.05),))

    def test_tiers_must_not_fall(self):
        with pytest.raises(ValueError, match="must not fall"):
            MarginParams(market_id="BTC", tiers=(RiskTier(1e5, 0.1, 0.05), RiskTier(math.inf, 0.05, 0.02)))

    def test_last_tier_unbounded(self):
        with pytest.raises(ValueError, match="last tier must be unbounded"):
            MarginParams(market_id="BTC", tiers=(RiskTier(1e5, 0.1, 0.05),))

    def test_naive_time_rejected(self):
        with pytest.raises(ValueError, match="valid_from must be timezone-aware"):
            MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05, valid_from=datetime(2026, 1, 1))

    def test_valid_window_order(self):
        with pytest.raises(ValueError, match="valid_until must be after valid_from"):
            MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05, valid_from=T0, valid_until=T0)

    def test_pending_needs_time(self):
        with pytest.raises(ValueError, match="together"):
            MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05, mm_rate_pending=0.06)

    def test_nested_validation(self):
        with pytest.raises(ValueError, match=r"haircuts.bridge_haircut must be in \[0, 1\], got 1.5"):
            CollateralHaircuts(bridge_haircut=1.5)
        with pytest.raises(ValueError, match="liquidation.target_health must be > 1"):
            LiquidationSettings(target_health=1.0)
        with pytest.raises(ValueError, match="spot_shocks must be > -1"):
            ScenarioGrid(spot_shocks=(-1.0, 0.1))
        with pytest.raises(ValueError, match="ewma_lambda"):
            RiskModel(ewma_lambda=1.0)

    def test_duplicate_markets(self):
        p = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05)
        with pytest.raises(ValueError, match="duplicate market_id"):
            ParamsFile(markets=(p, p))


class TestBehaviour:
    def test_default_grid_has_33_scenarios(self):
        g = ScenarioGrid()
        assert g.n_scenarios == 33
        assert min(g.spot_shocks) == pytest.approx(-0.15) and max(g.spot_shocks) == pytest.approx(0.15)

    def test_pending_mm_binds_at_effective_time(self):
        p = MarginParams(
            market_id="BTC", im_rate=0.1, mm_rate=0.05, mm_rate_pending=0.07, mm_effective_from=T0
        )
        assert p.tiers_at(T0 - timedelta(seconds=1))[0].mm_rate == 0.05
        assert p.tiers_at(T0)[0].mm_rate == 0.07
        assert p.tiers_at(None)[0].mm_rate == 0.05

    def test_valid_at(self):
        p = MarginParams(
            market_id="BTC", im_rate=0.1, mm_rate=0.05, valid_from=T0, valid_until=T0 + timedelta(hours=1)
        )
        assert p.is_valid_at(T0) and not p.is_valid_at(T0 + timedelta(hours=1))

    def test_with_rates_is_cheap_copy(self):
        p = MarginParams(market_id="BTC", tiers=(RiskTier(1e5, 0.05, 0.02), RiskTier(None, 0.1, 0.05)))
        q = p.with_rates(0.2, 0.1)
        assert q.tiers[0].im_rate == 0.2 and len(q.tiers) == 1 and q.market_id == "BTC"

    def test_round_trip_json(self):
        p = MarginParams(
            market_id="ETH",
            tiers=(RiskTier(1e5, 0.05, 0.02), RiskTier(math.inf, 0.1, 0.05)),
            mm_rate_pending=0.04,
            mm_effective_from=T0,
            haircuts=CollateralHaircuts(size_brackets=((1e6, 0.05),)),
            valid_from=T0,
            valid_until=T0 + timedelta(days=1),
        )
        d = json.loads(json.dumps(p.to_dict(), allow_nan=False))
        assert MarginParams.from_dict(d) == p
        pf = ParamsFile(markets=(p,), risk_model=RiskModel(underlyings=("ETH",), historical_returns=((0.01,),)))
        assert ParamsFile.from_dict(json.loads(json.dumps(pf.to_dict()))) == pf

    def test_unknown_field(self):
        with pytest.raises(ValueError, match="unknown MarginParams field"):
            MarginParams.from_dict({"market_id": "BTC", "im_rate": 0.1, "mm_rate": 0.05, "leverage": 10})
