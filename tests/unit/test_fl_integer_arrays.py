"""Integer and bool arrays (counters, masks) in client updates: no norm rule bounds them, so a
minority of clients must not be able to move them, and what a dtype cannot hold is refused.

The honest counters sit above 2**62, where a float64 holds only every 1024th integer: a result
computed through a float shows up as a wrong value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import numpy as np
import pytest

from enclaveml.fl._round import take_over
from enclaveml.fl._wire import MAX_EXAMPLES, decode_update, weights_item
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.strategies import (
    CentralDP,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Krum,
    NormClipping,
    TrimmedMean,
)
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights
from enclaveml.fl.validation import validate_updates

BASE = 2**62 + 1
MASK = np.array([True, False, True, True, False])
# Two int64 arrays (one dtype region with two members), an int8 and a uint8 array, a bool mask.
MODEL: Weights = [
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    np.array(BASE, np.int64),  # BatchNorm's num_batches_tracked
    np.zeros(4, np.float32),
    MASK.copy(),
    np.array([BASE, -BASE, 7], np.int64),
    np.array([-100, 0, 100], np.int8),
    np.array([0, 128, 255], np.uint8),
]
HONEST = 6


def honest(i: int) -> Weights:
    """Client ``i``: small float moves, counters moved by ``i``, the mask unchanged."""
    rng = np.random.default_rng(i)
    floats = [(g + 0.01 * rng.standard_normal(g.shape)).astype(g.dtype) for g in (MODEL[0], MODEL[2])]
    return [
        floats[0],
        np.array(BASE + i, np.int64),
        floats[1],
        MASK.copy(),
        np.array([BASE + i, -BASE - i, 7 + i], np.int64),
        np.array([-100 + i, -i, 100 + i], np.int8),
        np.array([i, 128 + i, 255 - i], np.uint8),
    ]


def malicious() -> Weights:
    """The honest clients' mean floats (Krum's favourite), every integer at an extreme, the mask flipped."""
    mean = [np.mean([honest(i)[j] for i in range(HONEST)], axis=0).astype(np.float32) for j in (0, 2)]
    top = np.iinfo(np.int64).max
    return [
        mean[0],
        np.array(top, np.int64),
        mean[1],
        ~MASK,
        np.array([top, np.iinfo(np.int64).min, top], np.int64),
        np.array([127, -128, 127], np.int8),
        np.array([255, 0, 0], np.uint8),
    ]


def honest_median() -> Weights:
    """Per integer array, the median of the six honest values and the malicious one: with one
    extreme among seven, the fourth smallest, an honest value (the masks: the honest one)."""
    sent = [honest(i) for i in range(HONEST)] + [malicious()]
    return [np.sort(np.stack([w[j] for w in sent]), axis=0)[3] for j in range(len(MODEL))]


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": lambda: FedAvg(),
    "fedprox": lambda: FedProx(0.1),
    "fedadam": lambda: FedAdam(eta=0.05),
    "fedyogi": lambda: FedYogi(),
    "median": lambda: CoordinateMedian(),
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "krum": lambda: Krum(1),
    "multi-krum": lambda: Krum(1, multi=3),
    "clipping-fedavg": lambda: NormClipping(FedAvg(), max_norm=0.01),
    "clipping-median": lambda: NormClipping(CoordinateMedian(), max_norm=0.01),
}


def run_round(strategy: Strategy, uploads: Sequence[tuple[Weights, int]], **options: Any) -> Aggregator:
    aggregator = Aggregator(strategy, MODEL, rounds=2, min_clients=1, **options)
    for i in range(len(uploads)):
        aggregator.enrol(f"c{i}")
    for i, (weights, examples) in enumerate(uploads):  # the last upload closes the round
        aggregator.submit(f"c{i}", 1, weights, examples)
    return aggregator


@pytest.mark.parametrize("make", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_one_client_cannot_move_integer_or_bool_arrays(make: Callable[[], Strategy]) -> None:
    # The malicious client also claims as many examples as the wire allows, and passes every
    # norm rule: its floats are the honest mean.
    uploads = [(honest(i), 10) for i in range(HONEST)] + [(malicious(), MAX_EXAMPLES)]
    aggregator = run_round(make(), uploads, validation={"max_norm": 1.0, "norm_outlier_factor": 3.0})
    record = aggregator.history[-1]
    assert record.status == "completed"
    assert record.rejected == {}
    got = aggregator.global_model().weights
    for j, (value, expected) in enumerate(zip(got, honest_median(), strict=True)):
        assert value.dtype == MODEL[j].dtype
        assert value.shape == MODEL[j].shape
        if MODEL[j].dtype.kind != "f":
            np.testing.assert_array_equal(value, expected, err_msg=f"array {j}")
    np.testing.assert_array_equal(got[3], MASK)
    # The aggregator's rows and plain lists of arrays give the same integers.
    listed = make().aggregate_train(
        1, MODEL, [ClientUpdate(f"c{i}", w, n) for i, (w, n) in enumerate(uploads)]
    )
    for j in (1, 3, 4, 5, 6):
        np.testing.assert_array_equal(np.asarray(listed[j]), got[j])


def test_central_dp_keeps_integer_arrays_at_the_global_value() -> None:
    strategy = CentralDP(FedAvg(), clip_norm=0.1, noise_multiplier=0.5, delta=1e-5, seed=1)
    uploads = [(honest(i), 10) for i in range(HONEST)] + [(malicious(), 10)]
    got = run_round(strategy, uploads).global_model().weights
    for j in (1, 3, 4, 5, 6):
        np.testing.assert_array_equal(got[j], MODEL[j])


def test_integers_are_the_exact_median_rounded_half_to_even_and_bools_the_majority() -> None:
    g: Weights = [np.zeros(1, np.float32), np.zeros(6, np.int64), np.zeros(3, np.uint8), np.zeros(3, bool)]
    top, bottom = int(np.iinfo(np.int64).max), int(np.iinfo(np.int64).min)

    def update(cid: str, ints: list[int], small: list[int], flags: list[bool], n: int) -> ClientUpdate:
        arrays: Weights = [
            np.zeros(1, np.float32),
            np.array(ints, np.int64),
            np.array(small, np.uint8),
            np.array(flags),
        ]
        return ClientUpdate(cid, arrays, n)

    # Two clients, example counts 1 and 3: the midpoint, whatever the counts say.
    pair = [
        update("a", [-3, 1, 2, top, bottom, BASE], [255, 0, 3], [True, True, False], 1),
        update("b", [0, 2, 3, top, top, BASE + 2], [254, 1, 4], [True, False, False], 3),
    ]
    out = FedAvg().aggregate_train(1, g, pair)
    # -1.5 -> -2, 1.5 -> 2, 2.5 -> 2, int64 max stays (no float: no overflow), -0.5 -> 0, exact
    np.testing.assert_array_equal(out[1], [-2, 2, 2, top, 0, BASE + 1])
    np.testing.assert_array_equal(out[2], [254, 0, 4])  # 254.5 -> 254, 0.5 -> 0, 3.5 -> 4
    np.testing.assert_array_equal(out[3], [True, False, False])  # a tie is False
    trio = [*pair, update("c", [9, 9, 9, 0, 0, 0], [9, 9, 9], [False, True, True], 1)]
    out = FedAvg().aggregate_train(1, g, trio)
    np.testing.assert_array_equal(out[1], [0, 2, 3, top, 0, BASE])
    np.testing.assert_array_equal(out[3], [True, True, False])  # two of three


def test_large_integer_arrays_match_the_reference_median() -> None:
    # Big enough for several blocks and the kernels' threads.
    rng = np.random.default_rng(3)
    size = 700_001
    g: Weights = [np.zeros(3, np.float32), np.zeros(size, np.int32), np.zeros(size, bool)]
    updates = [
        ClientUpdate(
            f"c{i}",
            [
                np.zeros(3, np.float32),
                rng.integers(-(2**31), 2**31, size, dtype=np.int32),
                rng.random(size) < 0.5,
            ],
            i + 1,
        )
        for i in range(6)
    ]
    out = FedAvg().aggregate_train(1, g, updates)
    ints = np.stack([u.weights[1] for u in updates]).astype(np.float64)
    np.testing.assert_array_equal(out[1], np.rint(np.median(ints, axis=0)).astype(np.int32))
    votes = np.sum([u.weights[2] for u in updates], axis=0)
    np.testing.assert_array_equal(out[2], votes > 3)


def _wire_update(weights: Weights, patch: dict[int, bytes]) -> Weights:
    """``weights`` sent over the wire with the data bytes of some tensors replaced."""
    item = weights_item(weights)
    for k, data in patch.items():
        item[k][2] = data
    body = {"v": 1, "round": 1, "num_examples": 1, "metrics": {}, "weights": item}
    return decode_update(cbor2.dumps(body, canonical=True)).weights


def test_bool_bytes_other_than_0_and_1_are_rejected() -> None:
    forged = _wire_update(honest(9), {3: bytes([1, 0, 2, 255, 0])})
    assert bool(forged[3][2])  # numpy reads byte 2 as True, and keeps it
    reason = "array 3 holds bool bytes other than 0 and 1"

    aggregator = run_round(FedAvg(), [(honest(0), 1), (honest(1), 1), (forged, 1)])
    record = aggregator.history[-1]
    assert record.rejected == {"c2": reason}
    assert record.accepted == ("c0", "c1")
    assert aggregator.global_model().weights[3].view(np.uint8).max() <= 1

    updates = [ClientUpdate("a", honest(0), 1), ClientUpdate("forged", forged, 1)]
    result = validate_updates(MODEL, updates)
    assert result.rejected == {"forged": reason}
    assert [u.client_id for u in result.accepted] == ["a"]


class PlainMean(Strategy):
    """A strategy of one's own that averages every array, counters included, in float64."""

    name = "plain-mean"

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        return [
            np.mean([np.float64(1.0) * u.weights[j] for u in updates], axis=0)
            for j in range(len(global_weights))
        ]

    def plan(self) -> dict[str, Any]:
        return {"name": self.name}


def test_float_results_for_integer_arrays_are_rounded_and_refused_when_they_do_not_fit() -> None:
    wide = honest(0)
    wide[5] = np.array([-99, 1, 101], np.int8)  # means -99.5, 0.5, 100.5 with honest(0)
    aggregator = run_round(PlainMean(), [(honest(0), 1), (wide, 1)])
    assert aggregator.history[-1].status == "completed"
    np.testing.assert_array_equal(aggregator.global_model().weights[5], [-100, 0, 100])  # not truncated

    # Every client sends int64 max: its float64 mean is 2**63, which a cast would wrap to -2**63.
    top = honest(0)
    top[1] = np.array(np.iinfo(np.int64).max, np.int64)
    before = aggregator.global_model().weights
    aggregator.submit("c0", 2, top, 1)
    aggregator.submit("c1", 2, [w.copy() for w in top], 1)
    assert aggregator.history[-1].status == "failed"  # the attempt fails; the round runs again
    after = aggregator.global_model().weights
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def test_integer_results_of_another_dtype_are_checked_too() -> None:
    """A strategy of one's own summing a counter in int64: 2**32 + 7 must not become 7 in int32."""
    previous = [np.zeros(3, np.float32), np.array([5], np.int32), np.array([True, False])]
    fits = take_over(
        [np.ones(3, np.float32), np.array([41], np.int64), np.array([1, 0], np.int64)], previous, None
    )
    assert (fits[1].dtype, fits[1].tolist(), fits[2].tolist()) == (np.dtype(np.int32), [41], [True, False])
    for wide in ([np.array([2**32 + 7], np.int64), np.array([1, 0])], [np.array([5]), np.array([2, 0])]):
        with pytest.raises(ValueError, match="do not fit"):
            take_over([np.ones(3, np.float32), *wide], previous, None)
