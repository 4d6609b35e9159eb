"""The aggregator's round storage: uploads copied once into matrix rows, strategies on those rows.

Each result is compared with the list-based reference (``validate_updates`` + the strategy on
plain lists of arrays), which the rest of the FL tests pin down by hand.
"""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl import _round
from enclaveml.fl._errors import NotEnrolledError, RoundMismatchError
from enclaveml.fl._wire import decode_update, encode_update
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
    UpdateMatrix,
)
from enclaveml.fl.strategies._kernels import delta_sq_norms, weighted_sum
from enclaveml.fl.strategies._round_updates import RoundUpdates
from enclaveml.fl.strategies._update_matrix import MatrixRows
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights
from enclaveml.fl.validation import validate_updates

# Mixed dtypes: a float32 region (two arrays), an int64 counter, float64 and float16 arrays.
MODEL = [
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    np.array(5, np.int64),
    np.arange(4, dtype=np.float32),
    np.array([0.5, -0.5, 2.0], np.float64),
    np.ones(5, np.float16),
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def moved(seed: int, scale: float = 0.1) -> Weights:
    rng = np.random.default_rng(seed)
    out: Weights = []
    for g in MODEL:
        if g.dtype.kind == "f":
            out.append((g + scale * rng.standard_normal(g.shape)).astype(g.dtype))
        else:
            out.append(np.asarray(g + seed))
    return out


def round_of_uploads() -> list[ClientUpdate]:
    """Honest updates, with a NaN one, a wrong shape and a boosted one among them."""
    updates = [ClientUpdate(f"c{i}", moved(i), 10 + 7 * i, {"loss": 0.1 * i}) for i in range(8)]
    updates[2].weights[2][1] = np.nan
    updates[4] = ClientUpdate("c4", [*moved(4)[:2], np.zeros(5, np.float32), *moved(4)[3:]], 3)
    updates[6] = ClientUpdate("c6", moved(6, scale=1000.0), 40)
    return updates


def aggregator_for(strategy: Strategy, clients: int, **options: Any) -> Aggregator:
    options = {"rounds": 3, "min_clients": 3, "round_timeout_s": 30.0, **options}
    aggregator = Aggregator(strategy, MODEL, **options)
    for i in range(clients):
        aggregator.enrol(f"c{i}")
    return aggregator


STRATEGIES = {
    "fedavg": lambda: FedAvg(),
    "fedprox": lambda: FedProx(0.1),
    "fedadam": lambda: FedAdam(eta=0.05),
    "fedyogi": lambda: FedYogi(),
    "median": lambda: CoordinateMedian(),
    "trimmed-mean": lambda: TrimmedMean(0.2),
    "multi-krum": lambda: Krum(1, multi=2),
    "clipping-fedavg": lambda: NormClipping(FedAvg(), max_norm=0.15),
    "clipping-median": lambda: NormClipping(CoordinateMedian(), max_norm=0.15),
    "central-dp": lambda: CentralDP(FedAvg(), clip_norm=0.15, noise_multiplier=0.5, delta=1e-5, seed=9),
}


@pytest.mark.parametrize("make", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_every_strategy_on_rows_equals_the_list_reference(make: Any) -> None:
    updates = round_of_uploads()
    aggregator = aggregator_for(make(), len(updates))
    for u in updates:  # the last upload closes the round
        aggregator.submit(u.client_id, 1, u.weights, u.num_examples, u.metrics)
    record = aggregator.history[-1]

    reference = validate_updates(MODEL, updates)
    assert record.rejected == reference.rejected
    assert set(record.rejected) == {"c2", "c4", "c6"}
    assert record.accepted == tuple(sorted(u.client_id for u in reference.accepted))
    expected = make().aggregate_train(1, MODEL, reference.accepted)
    got = aggregator.global_model().weights
    for g, e, ref in zip(got, expected, MODEL, strict=True):
        assert (g.dtype, g.shape) == (ref.dtype, ref.shape)
        np.testing.assert_allclose(g.astype(np.float64), np.asarray(e, np.float64), rtol=2e-3, atol=1e-5)
    counts = [u.num_examples for u in reference.accepted]
    loss = sum(u.metrics["loss"] * n for u, n in zip(reference.accepted, counts, strict=True)) / sum(counts)
    assert record.metrics["loss"] == pytest.approx(loss)


def test_a_dropout_leaves_no_stale_row_from_the_previous_round() -> None:
    clock = Clock()
    aggregator = aggregator_for(FedAvg(), 3, min_clients=2, clock=clock)
    for i, value in enumerate((100.0, 200.0, 300.0)):
        aggregator.submit(f"c{i}", 1, [np.full_like(g, value) for g in MODEL], 1)
    assert aggregator.completed_rounds == 1
    aggregator.submit("c0", 2, [np.full_like(g, 1.0) for g in MODEL], 1)
    aggregator.submit("c1", 2, [np.full_like(g, 3.0) for g in MODEL], 1)
    clock.now += 31  # c2 dropped out
    assert aggregator.poll()
    assert aggregator.history[-1].accepted == ("c0", "c1")
    for w in aggregator.global_model().weights:
        np.testing.assert_array_equal(w, np.full_like(w, 2.0))  # c2's 300 from round 1 is gone


def test_a_revoked_clients_row_does_not_count_and_late_enrolments_get_rows() -> None:
    aggregator = aggregator_for(FedAvg(), 2, min_clients=2)
    aggregator.submit("c0", 1, [np.full_like(g, 1.0) for g in MODEL], 1)  # a matrix of 2 rows
    for name in ("c2", "c3", "c4"):  # enrolled after the round opened: more rows than planned
        aggregator.enrol(name)
    aggregator.submit("c2", 1, [np.full_like(g, 99.0) for g in MODEL], 1)
    aggregator.revoke("c2")  # its upload goes, its row is reused
    aggregator.enrol("c2")
    for name, value in (("c3", 2.0), ("c4", 4.0), ("c2", 5.0), ("c1", 8.0)):
        aggregator.submit(name, 1, [np.full_like(g, value) for g in MODEL], 1)
    assert aggregator.history[-1].accepted == ("c0", "c1", "c2", "c3", "c4")
    for w in aggregator.global_model().weights:
        np.testing.assert_allclose(w, np.full_like(w, 4.0))  # (1 + 2 + 4 + 5 + 8) / 5


def test_uploads_are_copied_so_callers_and_decoded_messages_may_change_or_vanish() -> None:
    aggregator = aggregator_for(FedAvg(), 2, min_clients=2)
    mine = [np.full_like(g, 2.0) for g in MODEL]
    aggregator.submit("c0", 1, mine, 1)
    for w in mine:
        w[...] = 1000  # the caller keeps training on its arrays
    decoded = decode_update(encode_update(1, [np.full_like(g, 4.0) for g in MODEL], 1, {}), copy=False)
    assert not decoded.weights[0].flags.writeable  # views of the message: the only copy is the row
    aggregator.submit("c1", 1, decoded.weights, decoded.num_examples)
    for w in aggregator.global_model().weights:
        np.testing.assert_array_equal(w, np.full_like(w, 3.0))


def test_a_round_holds_one_copy_of_the_uploads_and_frees_it_at_close() -> None:
    n, p = 10, 1 << 20
    model = [np.zeros(p, np.float32)]
    aggregator = Aggregator(FedAvg(), model, rounds=2, min_clients=n, round_timeout_s=60.0)
    for i in range(n):
        aggregator.enrol(f"c{i}")
    uploads = [[np.full(p, float(i), np.float32)] for i in range(n)]
    round_bytes = n * p * 4
    tracemalloc.start()
    try:
        for i in range(n - 1):
            aggregator.submit(f"c{i}", 1, uploads[i], 1)
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        aggregator.submit(f"c{n - 1}", 1, uploads[n - 1], 1)  # closes the round
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert aggregator.completed_rounds == 1
    assert 0.95 * round_bytes <= held <= 1.1 * round_bytes  # the matrix, and nothing per upload
    assert peak <= 1.3 * round_bytes  # no second copy while validating and aggregating
    assert after <= 0.2 * round_bytes  # the rows are gone with the round
    np.testing.assert_allclose(aggregator.global_model().weights[0], np.full(p, 4.5))


class _HeldCopy:
    """c0 and c1 upload; c2's upload is then held inside its row copy, in a thread, until release()."""

    def __init__(self, aggregator: Aggregator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self._release = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        write = _round.RoundUploads.write

        def slow_write(rows: _round.RoundUploads, upload: _round.Upload, weights: Weights) -> None:
            if upload.client_id == "c2":
                self.entered.set()
                self._release.wait(10)
            write(rows, upload, weights)

        monkeypatch.setattr(_round.RoundUploads, "write", slow_write)
        aggregator.submit("c0", 1, [np.full_like(g, 1.0) for g in MODEL], 1)
        aggregator.submit("c1", 1, [np.full_like(g, 3.0) for g in MODEL], 1)

        def submit_c2() -> None:
            try:
                aggregator.submit("c2", 1, [np.full_like(g, 500.0) for g in MODEL], 1)
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                self.errors.append(exc)

        self._thread = threading.Thread(target=submit_c2)
        self._thread.start()
        assert self.entered.wait(10)

    def release(self) -> None:
        """Let c2's copy land and wait for its submit to return."""
        self._release.set()
        self._thread.join(10)


def test_an_upload_still_being_copied_when_the_round_closes_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    aggregator = aggregator_for(FedAvg(), 3, min_clients=2, clock=clock)
    held = _HeldCopy(aggregator, monkeypatch)
    assert aggregator.status()["uploads"] == 2  # a copy in progress is not an upload yet
    clock.now += 31
    assert aggregator.poll()  # closes with c0 and c1 while c2 is being copied
    held.release()
    assert [type(e) for e in held.errors] == [RoundMismatchError]
    assert isinstance(held.errors[0], RoundMismatchError)
    assert held.errors[0].current == 2
    assert aggregator.history[-1].accepted == ("c0", "c1")
    for w in aggregator.global_model().weights:
        np.testing.assert_array_equal(w, np.full_like(w, 2.0))


def test_a_row_still_being_written_by_a_revoked_client_is_not_given_to_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    aggregator = aggregator_for(FedAvg(), 5, min_clients=2, clock=clock)  # c4 never uploads
    held = _HeldCopy(aggregator, monkeypatch)
    aggregator.revoke("c2")
    aggregator.submit("c3", 1, [np.full_like(g, 5.0) for g in MODEL], 1)
    held.release()  # c2's copy lands now, after c3's
    assert [type(e) for e in held.errors] == [NotEnrolledError]
    clock.now += 31
    assert aggregator.poll()
    assert aggregator.history[-1].accepted == ("c0", "c1", "c3")
    for w in aggregator.global_model().weights:
        np.testing.assert_array_equal(w, np.full_like(w, 3.0))


def test_unknown_validation_options_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="unknown validation options"):
        Aggregator(FedAvg(), MODEL, rounds=1, min_clients=1, validation={"max_nrom": 1.0})
    with pytest.raises(ConfigurationError):
        Aggregator(FedAvg(), MODEL, rounds=1, min_clients=1, validation={"max_norm": -1.0})


# --- the kernels on matrix rows ------------------------------------------------------------------


def _matrix_round(n: int, chunks: int = 2) -> tuple[list[Weights], RoundUpdates]:
    """``n`` updates stored in ``chunks`` matrices, rows not in submission order."""
    lists = [moved(i) for i in range(n)]
    matrices = [UpdateMatrix(MODEL, n) for _ in range(chunks)]
    places = [(matrices[i % chunks], n - 1 - i) for i in range(n)]
    for (matrix, index), weights in zip(places, lists, strict=True):
        for dst, src in zip(matrix.row(index), weights, strict=True):
            dst[...] = src
    norms = delta_sq_norms(MODEL, lists)
    updates = RoundUpdates(
        MatrixRows(places), [f"c{i}" for i in range(n)], [1] * n, [{}] * n, norms, owned=True
    )
    return lists, updates


def test_matrix_rows_weighted_sum_matches_lists_across_dtypes_chunks_and_subsets() -> None:
    lists, updates = _matrix_round(7)
    coeffs = np.linspace(0.1, 1.0, 7)
    for positions in (range(7), [0, 2, 3, 6], [5]):
        chosen = updates.select(list(positions))
        expected = weighted_sum([lists[p] for p in positions], coeffs[list(positions)], MODEL)
        got = weighted_sum(chosen.rows, coeffs[list(positions)], MODEL)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    assert [u.client_id for u in updates[1:3]] == ["c1", "c2"]
    np.testing.assert_array_equal(updates[3].weights[0], lists[3][0])


def test_norm_clipping_scales_owned_rows_in_place_and_leaves_other_rows_alone() -> None:
    lists, owned = _matrix_round(5)
    _, borrowed = _matrix_round(5)
    borrowed = RoundUpdates(
        borrowed.rows, borrowed.client_ids, borrowed.num_examples, borrowed.metrics,
        borrowed.delta_sq_norms, owned=False,
    )  # fmt: skip
    before = [np.array(w) for w in borrowed[0].weights]
    reference = NormClipping(FedAvg(), 0.1).aggregate_train(
        1, MODEL, [ClientUpdate("x", w, 1) for w in lists]
    )
    for updates in (owned, borrowed):
        out = NormClipping(FedAvg(), 0.1).aggregate_train(1, MODEL, updates)
        for o, r in zip(out, reference, strict=True):
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)
    for w, b in zip(borrowed[0].weights, before, strict=True):
        np.testing.assert_array_equal(w, b)
    assert np.all(np.sqrt(delta_sq_norms(MODEL, lists)) > 0.2)
    clipped = np.sqrt(delta_sq_norms(MODEL, [owned[i].weights for i in range(5)]))
    np.testing.assert_allclose(clipped, 0.1, rtol=0.01)  # written back (float16 rounds a little)


def test_the_new_model_is_taken_over_without_a_copy_only_when_nothing_else_holds_it() -> None:
    _, updates = _matrix_round(3)
    previous = [np.array(g) for g in MODEL]
    fresh = [np.asarray(g + 1) for g in MODEL]
    kept = _round.take_over(fresh, previous, updates)
    assert all(np.shares_memory(k, f) for k, f in zip(kept, fresh, strict=True))
    read_only = [np.array(g) for g in MODEL]
    read_only[0].flags.writeable = False
    mixed = _round.take_over(read_only, previous, updates)
    assert [np.shares_memory(m, r) for m, r in zip(mixed, read_only, strict=True)] == [False, *[True] * 4]
    over_bytes = [np.frombuffer(g.tobytes(), g.dtype).reshape(g.shape) for g in MODEL]
    for aliased in (updates[0].weights, previous, over_bytes):
        copied = _round.take_over(aliased, previous, updates)
        for c, a, ref in zip(copied, aliased, MODEL, strict=True):
            assert not np.shares_memory(c, a)
            assert (c.dtype, c.shape) == (ref.dtype, ref.shape)
            assert c.flags.writeable
    (cast,) = _round.take_over([MODEL[0].astype(np.float64)], [MODEL[0]], None)
    assert cast.dtype == np.float32
