"""Synthetic trader population: determinism, distributions, validation."""

from __future__ import annotations

import numpy as np
import pytest

from backtest.population import POPULATION_DEFAULTS, Population, PopulationConfig, generate_population


class TestGenerate:
    def test_deterministic_with_seed(self):
        a = generate_population(500, PopulationConfig(n_positions=2000, seed=3))
        b = generate_population(500, PopulationConfig(n_positions=2000, seed=3))
        c = generate_population(500, PopulationConfig(n_positions=2000, seed=4))
        for name in ("open_bar", "hold_bars", "side", "leverage_draw", "notional", "topup_u"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(a.notional, c.notional)

    def test_shapes_sorted_and_ranges(self):
        cfg = PopulationConfig(n_positions=50_000, seed=1, long_share=0.6, leverage_max=40.0, hold_max_bars=30)
        p = generate_population(1000, cfg)
        assert len(p) == 50_000 and p.n_bars == 1000
        assert np.all(np.diff(p.open_bar) >= 0)
        assert p.open_bar.min() >= 0 and p.open_bar.max() <= 998  # every position can be held one bar
        assert set(np.unique(p.side)) == {-1.0, 1.0}
        assert abs((p.side > 0).mean() - 0.6) < 0.01
        assert p.leverage_draw.min() >= 1.0 and p.leverage_draw.max() <= 40.0
        assert abs(np.median(p.leverage_draw) - 10.0) < 0.3
        assert p.hold_bars.min() >= 1 and p.hold_bars.max() <= 30
        assert abs(np.median(p.notional) / 10_000 - 1) < 0.03
        assert p.topup_u.min() >= 0 and p.topup_u.max() < 1

    def test_geometric_hold_mean(self):
        p = generate_population(100, PopulationConfig(n_positions=100_000, hold_mean_bars=8, hold_max_bars=10_000))
        assert abs(p.hold_bars.mean() - 8.0) < 0.1

    def test_lognormal_hold_and_volume_arrival(self):
        vol = np.zeros(50)
        vol[10] = 1.0
        p = generate_population(50, PopulationConfig(n_positions=100, arrival="volume", hold="lognormal"), volume=vol)
        assert np.all(p.open_bar == 10)
        with pytest.raises(ValueError, match="needs the bar volumes"):
            generate_population(50, PopulationConfig(arrival="volume"))

    def test_subset_and_funding(self):
        p = generate_population(20, PopulationConfig(n_positions=30, funding_rate=tuple(np.linspace(0, 1e-3, 20))))
        s = p.subset(np.array([5, 1, 3]))
        assert len(s) == 3 and np.all(np.diff(s.open_bar) >= 0)
        np.testing.assert_allclose(p.funding_series(20), np.linspace(0, 1e-3, 20))
        with pytest.raises(ValueError, match="expected one per bar"):
            p.funding_series(21)
        q = generate_population(20, PopulationConfig(n_positions=3))
        np.testing.assert_array_equal(q.funding_series(4), np.full(4, 1e-4))

    def test_defaults_table_round_trip(self):
        assert POPULATION_DEFAULTS["n_positions"] == 10_000
        assert PopulationConfig.from_dict(PopulationConfig().to_dict()) == PopulationConfig()


class TestErrors:
    @pytest.mark.parametrize(
        ("kw", "match"),
        [
            ({"n_positions": 0}, "population.n_positions must be an integer >= 1, got 0"),
            ({"long_share": 1.5}, "population.long_share must be in"),
            ({"leverage_median": 0.5}, "population.leverage_median must be >= 1"),
            ({"hold_mean_bars": 0.5}, "population.hold_mean_bars must be >= 1"),
            ({"topup_prob": -0.1}, "population.topup_prob must be in"),
            ({"call_health": 0.9}, "population.call_health must be >= 1"),
            ({"funding_rate": 0.5}, "population.funding_rate must be finite"),
            ({"arrival": "poisson"}, "population.arrival must be"),
        ],
    )
    def test_bad_config(self, kw, match):
        with pytest.raises(ValueError, match=match):
            PopulationConfig(**kw)

    def test_unknown_key_and_bad_bars(self):
        with pytest.raises(ValueError, match="unknown keys"):
            PopulationConfig.from_dict({"n_position": 3})
        with pytest.raises(ValueError, match="n_bars must be an integer >= 2"):
            generate_population(1)

    def test_bad_arrays_rejected(self):
        z = np.zeros(2)
        base = {"open_bar": np.array([0, 1]), "hold_bars": np.ones(2, int), "side": z + 1, "leverage_draw": z + 2,
                "notional": z + 1, "topup_u": z, "n_bars": 5}
        for name, value, match in (("hold_bars", np.array([1, 0]), "population.hold_bars must be >= 1, got 0"),
                                   ("side", np.array([1.0, 0.5]), "population.side must be"),
                                   ("notional", np.array([1.0, -1.0]), "population.notional must be finite"),
                                   ("open_bar", np.array([0, 5]), r"population.open_bar must be in \[0, n_bars=5\)")):
            with pytest.raises(ValueError, match=match):
                Population(**{**base, name: value})
        arr = np.array([0.5, 0.5])
        p = Population(**{**base, "topup_u": arr})
        assert arr.flags.writeable and not p.topup_u.flags.writeable  # the caller's array is not touched

    def test_unsorted_rejected(self):
        z = np.zeros(2)
        with pytest.raises(ValueError, match="sorted"):
            Population(open_bar=np.array([3, 1]), hold_bars=np.ones(2, int), side=z + 1, leverage_draw=z + 2,
                        notional=z + 1, topup_u=z, n_bars=5)
