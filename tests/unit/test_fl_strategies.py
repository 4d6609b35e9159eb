"""Aggregation strategies: exact results on hand-checkable inputs, robustness, optimizer state, central DP."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategies import (
    STRATEGIES,
    CentralDP,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    NormClipping,
    TrimmedMean,
    UpdateMatrix,
    _kernels,
    proximal_term,
    strategy_from_plan,
)
from enclaveml.fl.strategies._update_matrix import matrix_runs, whole_row_sum
from enclaveml.fl.strategy import ClientUpdate, Strategy
from enclaveml.fl.validation import validate_updates


def up(cid: str, *arrays: object, n: int = 1) -> ClientUpdate:
    return ClientUpdate(cid, [np.asarray(a) for a in arrays], n)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# --- FedAvg / FedProx --------------------------------------------------------------------------


def test_fedavg_is_example_weighted_and_keeps_dtypes_and_shapes() -> None:
    g = [np.zeros((1, 2), np.float32), np.array(0, np.int64)]
    updates = [
        ClientUpdate("a", [np.array([[1.0, 2.0]], np.float32), np.array(10, np.int64)], 1),
        ClientUpdate("b", [np.array([[3.0, 6.0]], np.float32), np.array(21, np.int64)], 3),
    ]
    out = FedAvg().aggregate_train(1, g, updates)
    np.testing.assert_array_equal(out[0], [[2.5, 5.0]])  # (1·1 + 3·3)/4, (1·2 + 3·6)/4
    assert out[0].dtype == np.float32
    assert isinstance(out[1], np.ndarray)
    assert out[1].dtype == np.int64
    assert int(out[1]) == 16  # integers: unweighted median, 15.5 rounds to even
    assert FedAvg().plan() == {"name": "fedavg"}


def _random_round(
    n: int, sizes: tuple[int, ...], seed: int = 0
) -> tuple[list[np.ndarray], list[ClientUpdate]]:
    rng = np.random.default_rng(seed)
    g = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    updates = [
        ClientUpdate(f"c{i}", [x + rng.standard_normal(x.shape).astype(np.float32) for x in g], int(i + 1))
        for i in range(n)
    ]
    return g, updates


def test_fedavg_large_inputs_match_float64_reference_threaded_and_matrix_paths() -> None:
    g, updates = _random_round(12, (3 * _kernels.BLOCK + 5, 7))
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    reference = [
        sum((c / counts.sum()) * u.weights[j].astype(np.float64) for c, u in zip(counts, updates))
        for j in range(2)
    ]
    general = FedAvg().aggregate_train(1, g, updates)

    matrix = UpdateMatrix(g, len(updates))
    rows = []
    for i, u in enumerate(updates):
        row = matrix.row(i)
        for dst, src in zip(row, u.weights):
            dst[...] = src
        rows.append(ClientUpdate(u.client_id, row, u.num_examples))
    assert [(a, b) for a, b, _ in matrix_runs([r.weights[0].reshape(-1) for r in rows])] == [(0, 12)]
    assert whole_row_sum([r.weights for r in rows], np.full(12, 1 / 12), g) is not None
    stacked = FedAvg().aggregate_train(1, g, rows)
    # A rejected client splits the rows into two runs (whole-row BLAS path); a client decoded into
    # separate arrays among matrix rows takes the per-array path (BLAS runs plus a threaded single).
    for mixed in (rows[:5] + rows[6:], [*rows[:5], updates[5], *rows[6:]]):
        c = np.array([u.num_examples for u in mixed], dtype=np.float64)
        expected = [
            sum((k / c.sum()) * u.weights[j].astype(np.float64) for k, u in zip(c, mixed)) for j in range(2)
        ]
        got = FedAvg().aggregate_train(1, g, mixed)
        for j in range(2):
            np.testing.assert_allclose(got[j], expected[j], atol=2e-5)
    for j in range(2):
        np.testing.assert_allclose(general[j], reference[j], atol=2e-5)
        np.testing.assert_allclose(stacked[j], reference[j], atol=2e-5)


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    g = [f32(0.0, 0.0)]
    updates = [up("a", f32(1.0, 2.0), n=1), up("b", f32(3.0, 6.0), n=3)]
    prox = FedProx(proximal_mu=0.1)
    assert prox.configure_train(1, g) == {"proximal_mu": 0.1}
    assert prox.plan() == {"name": "fedprox", "proximal_mu": 0.1}
    np.testing.assert_array_equal(prox.aggregate_train(1, g, updates)[0], [2.5, 5.0])
    with pytest.raises(ConfigurationError):
        FedProx(proximal_mu=-1.0)


def test_proximal_term_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    assert proximal_term([np.array([1.0, 2.0])], [np.array([0.0, 0.0])], 0.5) == pytest.approx(1.25)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    term = proximal_term([w], [np.array([0.0, 1.0], np.float32)], 0.5)
    assert float(term.detach()) == pytest.approx(0.25 * (1.0 + 1.0))
    term.backward()
    np.testing.assert_allclose(w.grad.numpy(), [0.5, 0.5])  # mu · (w - w_global)


# --- FedAdam / FedYogi -------------------------------------------------------------------------


def _optimizer_by_hand(
    rule: str, deltas: list[float], eta: float = 0.1, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> list[float]:
    w, m, v, out = 0.0, 0.0, tau**2, []
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        v = (
            b2 * v + (1 - b2) * d * d
            if rule == "adam"
            else v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        )
        w = w + eta * m / (math.sqrt(v) + tau)
        out.append(w)
    return out


@pytest.mark.parametrize(("cls", "rule"), [(FedAdam, "adam"), (FedYogi, "yogi")])
def test_server_optimizers_match_the_update_rule_by_hand(cls: type[Strategy], rule: str) -> None:
    strategy = cls()
    deltas = [1.0, 0.1, -0.5]
    expected = _optimizer_by_hand(rule, deltas)
    g = [np.array([0.0])]
    for r, (d, want) in enumerate(zip(deltas, expected, strict=True), start=1):
        # Two clients whose example-weighted mean change is d.
        updates = [up("a", g[0] + 2 * d, n=1), up("b", g[0] + 0.5 * d, n=2)]
        g = strategy.aggregate_train(r, g, updates)
        assert float(g[0][0]) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimizer_state_round_trip(cls: type[Strategy]) -> None:
    g0, rounds = _random_round(3, (50, 4), seed=1)
    a = cls()
    assert a.state() == {}
    g = a.aggregate_train(1, g0, rounds)
    g = a.aggregate_train(2, g, [ClientUpdate(u.client_id, [w * 0.5 for w in u.weights], 2) for u in rounds])
    saved = a.state()
    assert set(saved) == {"rounds", "m/0", "m/1", "v/0", "v/1"}
    b = cls()
    b.load_state(saved)
    third = [ClientUpdate(u.client_id, [w + 1 for w in u.weights], 1) for u in rounds]
    for x, y in zip(a.aggregate_train(3, g, third), b.aggregate_train(3, g, third), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigurationError):
        cls().load_state({"m/0": saved["m/0"]})
    b.load_state({})
    assert b.state() == {}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_a_large_step_does_not_freeze_a_float16_weight(cls: type[Strategy]) -> None:
    """300**2 overflows float16: moments kept in float16 left v at inf and the weight stuck."""
    strategy = cls(eta=0.1)
    g = [np.zeros(2, np.float16)]
    g = strategy.aggregate_train(1, g, [up("a", np.array([300.0, 1.0], np.float16))])
    assert g[0].dtype == np.float16
    assert np.isfinite(strategy.state()["v/0"]).all()
    assert strategy.state()["v/0"].dtype == np.float32
    before = g[0].copy()
    for r in range(2, 5):  # every later round pulls both weights up
        g = strategy.aggregate_train(r, g, [up("a", g[0] + np.float16(1.0))])
    assert (g[0] > before).all()
    # State an older enclaveml checkpointed in float16 continues in float32.
    old = {k: (v.astype(np.float16) if k != "rounds" else v) for k, v in strategy.state().items()}
    resumed = cls(eta=0.1)
    resumed.load_state(old)
    resumed.aggregate_train(5, g, [up("a", g[0] + np.float16(1.0))])
    assert resumed.state()["m/0"].dtype == np.float32
    # A run whose float16 v already overflowed (saved so by an older enclaveml) moves again.
    frozen = {**old, "v/0": np.array([np.inf, 1.0], np.float16)}
    thawed = cls(eta=0.1)
    thawed.load_state(frozen)
    before = g[0].copy()
    after = thawed.aggregate_train(6, g, [up("a", g[0] + np.float16(1.0))])[0]
    assert np.isfinite(thawed.state()["v/0"]).all()
    assert after[0] > before[0]


# --- robust strategies ---------------------------------------------------------------------------


def test_median_and_trimmed_mean_exact() -> None:
    g = [f32(0.0, 0.0)]
    three = [up("a", f32(1, -1)), up("b", f32(2, -2)), up("c", f32(100, 50))]
    np.testing.assert_array_equal(CoordinateMedian().aggregate_train(1, g, three)[0], [2, -1])
    four = [*three, up("d", f32(3, -3))]
    np.testing.assert_array_equal(CoordinateMedian().aggregate_train(1, g, four)[0], [2.5, -1.5])
    np.testing.assert_array_equal(TrimmedMean(0.25).aggregate_train(1, g, four)[0], [2.5, -1.5])
    five = [*four, up("e", f32(-50, 4))]
    # beta 0.2 of 5 drops one value on each side: mean(1, 2, 3) and mean(-2, -1, 4).
    np.testing.assert_allclose(TrimmedMean(0.2).aggregate_train(1, g, five)[0], [2.0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(TrimmedMean(0.0).aggregate_train(1, g, five)[0], [11.2, 9.6], rtol=1e-6)
    with pytest.raises(ConfigurationError):
        TrimmedMean(0.5)


def test_krum_exact_selection() -> None:
    g = [f32(0.0)]
    updates = [up(str(i), f32(x)) for i, x in enumerate([0.0, 1.0, 3.0, 4.5, 100.0])]
    # f = 1: scores over the 2 nearest: 0→1+9, 1→1+4, 3→4+2.25, 4.5→2.25+12.25, 100→huge.
    krum = Krum(num_malicious=1)
    assert krum.select(g, updates) == [1]
    np.testing.assert_array_equal(krum.aggregate_train(1, g, updates)[0], [1.0])
    np.testing.assert_array_equal(Krum(1, multi=2).aggregate_train(1, g, updates)[0], [2.0])
    assert Krum(2, multi=1).min_updates == 7
    with pytest.raises(ConfigurationError, match="at least 7"):
        Krum(2).aggregate_train(1, g, updates)
    with pytest.raises(ConfigurationError):
        Krum(-1)


def _honest_and_boosted(seed: int = 3) -> tuple[list[np.ndarray], list[ClientUpdate], ClientUpdate]:
    rng = np.random.default_rng(seed)
    g = [rng.standard_normal(2000).astype(np.float32)]
    honest = [up(f"h{i}", g[0] + 0.01 * rng.standard_normal(2000).astype(np.float32)) for i in range(9)]
    boosted = up("evil", g[0] + 100 * (honest[0].weights[0] - g[0]))  # model replacement, scaled 100x
    return g, honest, boosted


@pytest.mark.parametrize("strategy", [CoordinateMedian(), TrimmedMean(0.1), Krum(1), Krum(1, multi=3)])
def test_robust_strategies_bound_a_boosted_update(strategy: Strategy) -> None:
    g, honest, boosted = _honest_and_boosted()
    out = strategy.aggregate_train(1, g, [*honest[:4], boosted, *honest[4:]])[0]
    stack = np.stack([u.weights[0] for u in honest])
    assert np.all(out >= stack.min(axis=0) - 1e-6)
    assert np.all(out <= stack.max(axis=0) + 1e-6)
    spread = max(float(np.linalg.norm(u.weights[0] - g[0])) for u in honest)
    assert float(np.linalg.norm(out - g[0])) <= spread
    # The same attack moves FedAvg far outside the honest spread: the check above is not vacuous.
    mean = FedAvg().aggregate_train(1, g, [*honest, boosted])[0]
    assert float(np.linalg.norm(mean - g[0])) > 5 * spread


def test_nan_update_is_rejected_and_median_of_the_rest_is_unaffected() -> None:
    g, honest, _ = _honest_and_boosted()
    poisoned = up("nan", g[0].copy())
    poisoned.weights[0][7] = np.nan
    result = validate_updates(g, [*honest, poisoned])
    assert result.rejected == {"nan": "contains NaN or Inf"}
    out = CoordinateMedian().aggregate_train(1, g, result.accepted)[0]
    np.testing.assert_array_equal(out, np.median(np.stack([u.weights[0] for u in honest]), axis=0))


def test_norm_clipping_exact_and_leaves_small_updates_untouched() -> None:
    g = [f32(0.0, 0.0)]
    big, small = up("big", f32(3.0, 4.0)), up("small", f32(0.0, 0.5))
    seen: list[ClientUpdate] = []

    class Spy(FedAvg):
        def aggregate_train(
            self, server_round: int, global_weights: list[np.ndarray], updates: Sequence[ClientUpdate]
        ) -> list[np.ndarray]:
            seen.extend(updates)
            return super().aggregate_train(server_round, global_weights, updates)

    out = NormClipping(Spy(), max_norm=1.0).aggregate_train(1, g, [big, small])
    np.testing.assert_allclose(out[0], [0.3, 0.65], rtol=1e-6)  # mean of (0.6, 0.8) and (0, 0.5)
    assert seen[1] is small
    np.testing.assert_allclose(seen[0].weights[0], [0.6, 0.8], rtol=1e-6)
    assert NormClipping(FedProx(0.2), 1.0).configure_train(1, g) == {"proximal_mu": 0.2}


# --- central DP --------------------------------------------------------------------------------


def test_central_dp_noise_scale_matches_the_formula() -> None:
    g = [np.zeros(200_000, np.float32)]
    dp = CentralDP(FedAvg(), clip_norm=2.0, noise_multiplier=1.5, delta=1e-5, seed=7)
    assert dp.noise_std(4) == pytest.approx(1.5 * 2.0 / 4)
    out = dp.aggregate_train(1, g, [up(str(i), g[0].copy()) for i in range(4)])[0]  # zero deltas: pure noise
    assert float(np.std(out)) == pytest.approx(0.75, rel=0.01)
    assert abs(float(np.mean(out))) < 0.01


def test_central_dp_clips_and_averages_uniformly() -> None:
    g = [f32(0.0, 0.0)]
    dp = CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=1e-9, delta=1e-5, seed=0)
    out = dp.aggregate_train(1, g, [up("a", f32(3.0, 4.0), n=100), up("b", f32(0.0, 0.5), n=1)])
    np.testing.assert_allclose(out[0], [0.3, 0.65], atol=1e-6)  # example counts are ignored


def test_central_dp_epsilon_grows_and_equals_opacus() -> None:
    from opacus.accountants import RDPAccountant

    g, updates = _random_round(5, (30,), seed=2)
    dp = CentralDP(FedAdam(), clip_norm=1.0, noise_multiplier=1.1, delta=1e-5, seed=1)
    assert dp.privacy_spent() == (0.0, 1e-5)
    reference = RDPAccountant()
    epsilons = []
    for r in range(1, 4):
        g = dp.aggregate_train(r, g, updates)
        reference.step(noise_multiplier=1.1, sample_rate=1.0)
        eps, delta = dp.privacy_spent()
        assert delta == 1e-5
        assert eps == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
        epsilons.append(eps)
    assert epsilons[0] < epsilons[1] < epsilons[2]

    restored = CentralDP(FedAdam(), clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    restored.load_state(dp.state())
    assert restored.privacy_spent() == dp.privacy_spent()
    assert {"m/0", "v/0", "rounds"} <= set(dp.state())


def test_central_dp_seed_sample_rate_and_inner_checks() -> None:
    g, updates = _random_round(3, (40,), seed=4)
    runs = [CentralDP(FedAvg(), 1.0, 1.0, 1e-5, seed=3).aggregate_train(1, g, updates)[0] for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    sampled = CentralDP(FedAvg(), 1.0, 1.0, 1e-5, sample_rate=0.1)
    full = CentralDP(FedAvg(), 1.0, 1.0, 1e-5)
    for s in (sampled, full):
        s.aggregate_train(1, g, updates)
    assert sampled.privacy_spent()[0] < full.privacy_spent()[0]
    with pytest.raises(ConfigurationError):
        CentralDP(Krum(1), 1.0, 1.0, 1e-5)
    with pytest.raises(ConfigurationError):
        CentralDP(FedAvg(), 1.0, 1.0, delta=0.0)


def test_plans_are_json_and_name_every_hyperparameter() -> None:
    strategies: list[Strategy] = [
        FedAvg(), FedProx(0.01), FedAdam(eta=0.01), FedYogi(tau=1e-2), CoordinateMedian(), TrimmedMean(0.1),
        Krum(2, multi=3), NormClipping(FedAvg(), 5.0), CentralDP(FedYogi(), 1.0, 0.8, 1e-6),
    ]  # fmt: skip
    names = [json.loads(json.dumps(s.plan()))["name"] for s in strategies]
    assert names == [s.name for s in strategies]
    assert sorted(STRATEGIES) == sorted(names)
    for s in strategies:
        rebuilt = strategy_from_plan(json.loads(json.dumps(s.plan())))
        assert type(rebuilt) is type(s)
        assert rebuilt.plan() == s.plan()
    with pytest.raises(ConfigurationError, match="unknown strategy"):
        strategy_from_plan({"name": "fedsgd"})
    with pytest.raises(ConfigurationError, match="does not take"):
        strategy_from_plan({"name": "krum", "num_malicious": 1, "evil": True})
    assert CentralDP(FedYogi(), 1.0, 0.8, 1e-6).plan()["inner"]["name"] == "fedyogi"
    assert Krum(2, multi=3).plan() == {"name": "krum", "num_malicious": 2, "multi": 3}


def test_public_names_are_exactly_the_intended_ones() -> None:
    import enclaveml.fl.strategies as strategies

    assert set(strategies.__all__) == {
        "STRATEGIES", "CentralDP", "CoordinateMedian", "FedAdam", "FedAvg", "FedProx", "FedYogi", "Krum",
        "NormClipping", "TrimmedMean", "UpdateMatrix", "proximal_term", "strategy_from_plan",
    }  # fmt: skip
    for name in strategies.__all__:
        assert getattr(strategies, name) is not None
