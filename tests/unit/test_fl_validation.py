"""Update validation: every kind of bad update is rejected with a short reason that leaks no values."""

from __future__ import annotations

import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategy import ClientUpdate
from enclaveml.fl.validation import ValidationResult, validate_updates

SECRET = 12345.678  # a parameter value that must never appear in a reason


def global_model() -> list[np.ndarray]:
    return [np.zeros((2, 3), np.float32), np.zeros(4, np.float32), np.array(7, np.int64)]


def honest(cid: str, scale: float = 0.1, seed: int = 0) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    weights = [np.asarray(g + scale * rng.standard_normal(g.shape)).astype(g.dtype) for g in global_model()]
    return ClientUpdate(cid, weights, 10)


def with_array(cid: str, index: int, array: object) -> ClientUpdate:
    weights = honest(cid).weights
    weights[index] = array  # type: ignore[call-overload]
    return ClientUpdate(cid, weights, 10)


def test_well_formed_updates_are_all_accepted_in_order() -> None:
    updates = [honest(f"c{i}", seed=i) for i in range(5)]
    result = validate_updates(global_model(), updates)
    assert isinstance(result, ValidationResult)
    assert [u.client_id for u in result.accepted] == ["c0", "c1", "c2", "c3", "c4"]
    assert result.rejected == {}


def test_each_bad_kind_is_rejected_with_its_reason() -> None:
    nan = honest("nan")
    nan.weights[1][:] = [SECRET, np.nan, 0, 0]
    inf = honest("inf")
    inf.weights[0][1, 2] = -np.inf
    bad = [
        ClientUpdate("few", honest("few").weights[:2], 10),
        with_array("shape", 0, np.zeros((3, 2), np.float32)),
        with_array("dtype", 1, np.zeros(4, np.float64)),
        with_array("list", 1, [SECRET, 0.0, 0.0, 0.0]),
        nan,
        inf,
        ClientUpdate("zero", honest("zero").weights, 0),
        ClientUpdate("boolean", honest("boolean").weights, True),  # type: ignore[arg-type]
    ]
    good = [honest(f"ok{i}", seed=10 + i) for i in range(4)]
    result = validate_updates(global_model(), [*good, *bad])
    assert [u.client_id for u in result.accepted] == ["ok0", "ok1", "ok2", "ok3"]
    assert result.rejected == {
        "few": "expected 3 arrays, got 2",
        "shape": "array 0 has shape (3, 2), expected (2, 3)",
        "dtype": "array 1 has dtype float64, expected float32",
        "list": "array 1 is not a numpy array",
        "nan": "contains NaN or Inf",
        "inf": "contains NaN or Inf",
        "zero": "num_examples must be a positive integer",
        "boolean": "num_examples must be a positive integer",
    }
    assert not any("12345" in reason for reason in result.rejected.values())


def test_norm_outlier_and_max_norm() -> None:
    updates = [honest(f"c{i}", seed=i) for i in range(6)]
    boosted = honest("boosted", scale=0.1 * 100, seed=99)  # a 100x scaled update
    result = validate_updates(global_model(), [*updates, boosted])
    assert result.rejected == {"boosted": "update norm is an outlier (above factor x median)"}
    assert len(result.accepted) == 6
    assert validate_updates(global_model(), [*updates, boosted], norm_outlier_factor=None).rejected == {}

    capped = validate_updates(global_model(), [*updates, boosted], max_norm=1.0, norm_outlier_factor=None)
    assert capped.rejected == {"boosted": "update norm exceeds max_norm"}
    assert not any(any(ch.isdigit() for ch in reason) for reason in capped.rejected.values())


def test_outlier_rule_needs_a_majority_and_a_scale() -> None:
    g = global_model()
    pair = [honest("a"), honest("b", scale=100.0, seed=1)]
    assert validate_updates(g, pair).rejected == {}  # two updates: nobody to outvote
    unchanged = [ClientUpdate(f"same{i}", [w.copy() for w in g], 1) for i in range(3)]
    assert validate_updates(g, [*unchanged, honest("moved")]).rejected == {}  # median norm 0: rule skipped


def test_integer_counters_do_not_count_towards_the_norm() -> None:
    updates = [honest(f"c{i}", seed=i) for i in range(4)]
    counter = honest("counter", seed=9)
    counter.weights[2] = np.array(10**9, np.int64)
    assert validate_updates(global_model(), [*updates, counter]).rejected == {}


def test_duplicates_are_all_rejected_and_overflow_is_told_apart_from_nan() -> None:
    g = [np.full(3, -3e38, np.float32)]
    overflow = ClientUpdate("huge", [np.full(3, 3e38, np.float32)], 1)  # finite, but w - g overflows
    twice = [ClientUpdate("dup", [g[0].copy()], 1), ClientUpdate("dup", [g[0].copy()], 2)]
    result = validate_updates(g, [overflow, *twice])
    assert result.rejected == {"huge": "update norm overflows", "dup": "duplicate client_id"}
    assert result.accepted == []


@pytest.mark.parametrize("options", [{"max_norm": 0.0}, {"norm_outlier_factor": 0.5}, {"max_norm": "1"}])
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        validate_updates(global_model(), [honest("a")], **options)  # type: ignore[arg-type]
