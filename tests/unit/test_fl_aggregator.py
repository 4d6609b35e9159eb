"""The in-process aggregator core: rounds, enrolment, dropouts and deadlines, validation, checkpoints."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest

from enclaveml.crypto import KeyHandle
from enclaveml.errors import ConfigurationError, DecryptionError
from enclaveml.fl._checkpoint import CheckpointStore
from enclaveml.fl._errors import (
    DuplicateUpdateError,
    InvalidUpdateError,
    NotEnrolledError,
    RoundMismatchError,
    TrainingFinishedError,
)
from enclaveml.fl._wire import (
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    weights_item,
    weights_sha256,
)
from enclaveml.fl.aggregator import Aggregator, token_sha256
from enclaveml.fl.client import InProcessConnection, TrainResult, participate
from enclaveml.fl.plan import TrainingPlan
from enclaveml.fl.strategies import FedAdam, FedAvg
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights

INITIAL = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
KEY = KeyHandle.generate("fl-checkpoint")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingMean(Strategy):
    """Unweighted mean, with server state (a counter) so checkpoints must carry strategy state."""

    name = "counting-mean"

    def __init__(self) -> None:
        self.calls = np.zeros(1, np.int64)

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        self.calls += 1
        return [np.mean([u.weights[i] for u in updates], axis=0) for i in range(len(global_weights))]

    def configure_train(self, server_round: int, global_weights: Weights) -> dict[str, Any]:
        return {"lr": 0.1, "round": server_round}

    def plan(self) -> dict[str, Any]:
        return {"name": self.name}

    def state(self) -> dict[str, np.ndarray]:
        return {"calls": self.calls.copy()}

    def load_state(self, state: Any) -> None:
        self.calls = np.array(state["calls"])


def filled(value: float) -> Weights:
    return [np.full_like(w, value) for w in INITIAL]


def make(clients: int = 3, **options: Any) -> tuple[Aggregator, dict[str, str]]:
    options = {"rounds": 3, "min_clients": 2, "round_timeout_s": 60.0, **options}
    aggregator = Aggregator(options.pop("strategy", None) or CountingMean(), INITIAL, **options)
    return aggregator, {f"c{i}": aggregator.enrol(f"c{i}") for i in range(clients)}


def test_rounds_aggregate_only_when_everyone_uploaded_and_stop_after_the_plan() -> None:
    aggregator, _ = make()
    message = aggregator.global_model("c0")
    assert (message.round, message.completed_rounds, message.finished, message.uploaded) == (
        1,
        0,
        False,
        False,
    )
    assert message.config == {"lr": 0.1, "round": 1}
    for round_ in (1, 2, 3):
        for i in range(3):
            assert aggregator.submit(f"c{i}", round_, filled(i + round_), num_examples=10) == i + 1 or i == 2
        assert aggregator.completed_rounds == round_
        np.testing.assert_allclose(aggregator.global_model().weights[0], np.full((2, 3), 1 + round_))
    assert aggregator.finished
    assert [r.status for r in aggregator.history] == ["completed"] * 3
    assert aggregator.history[0].accepted == ("c0", "c1", "c2")
    assert aggregator.history[0].closed_by == "all"
    with pytest.raises(TrainingFinishedError):
        aggregator.submit("c0", 4, filled(0), num_examples=1)
    assert aggregator.global_model().finished


def test_submit_refuses_wrong_round_duplicates_and_strangers() -> None:
    aggregator, _ = make()
    with pytest.raises(RoundMismatchError) as info:
        aggregator.submit("c0", 2, filled(1), num_examples=1)
    assert info.value.current == 1
    aggregator.submit("c0", 1, filled(1), num_examples=1)
    assert aggregator.has_uploaded("c0")
    assert aggregator.global_model("c0").uploaded
    with pytest.raises(DuplicateUpdateError):
        aggregator.submit("c0", 1, filled(2), num_examples=1)
    with pytest.raises(NotEnrolledError):
        aggregator.submit("mallory", 1, filled(1), num_examples=1)
    with pytest.raises(InvalidUpdateError):
        aggregator.submit("c1", 1, filled(1), num_examples=0)


def test_enrolment_keeps_only_credential_hashes() -> None:
    aggregator, tokens = make()
    assert aggregator.authenticate(tokens["c1"]) == "c1"
    assert aggregator.enrolled == {"c0", "c1", "c2"}
    assert not any(token in repr(vars(aggregator)) for token in tokens.values())
    with pytest.raises(NotEnrolledError):
        aggregator.authenticate("guess")
    aggregator.enrol_hashed("c9", token_sha256("operator-issued"))
    assert aggregator.authenticate("operator-issued") == "c9"
    new = aggregator.enrol("c1")  # re-enrolment replaces the old credential
    with pytest.raises(NotEnrolledError):
        aggregator.authenticate(tokens["c1"])
    assert aggregator.authenticate(new) == "c1"
    aggregator.revoke("c9")
    with pytest.raises(NotEnrolledError):
        aggregator.authenticate("operator-issued")
    with pytest.raises(ConfigurationError):
        aggregator.enrol_hashed("c8", token_sha256(new))


def test_deadline_closes_with_the_clients_that_came_dropouts_are_not_waited_for() -> None:
    clock = Clock()
    aggregator, _ = make(clients=5, min_clients=3, round_timeout_s=30.0, clock=clock)
    aggregator.submit("c0", 1, filled(1), num_examples=1)
    aggregator.submit("c1", 1, filled(2), num_examples=1)
    clock.now += 31
    assert not aggregator.poll()  # past the deadline, but fewer than min_clients: keep waiting
    assert aggregator.status()["seconds_left"] == 0.0
    assert aggregator.completed_rounds == 0
    aggregator.submit("c2", 1, filled(3), num_examples=1)  # the third closes it at once
    assert aggregator.completed_rounds == 1
    assert aggregator.history[-1].closed_by == "timeout"
    assert aggregator.history[-1].accepted == (
        "c0",
        "c1",
        "c2",
    )
    np.testing.assert_allclose(aggregator.global_model().weights[1], [2, 2, 2])
    with pytest.raises(RoundMismatchError):  # a straggler from round 1
        aggregator.submit("c3", 1, filled(9), num_examples=1)
    for i in range(3):  # round 2: three in time, the deadline passes, the ticker closes it
        aggregator.submit(f"c{i}", 2, filled(1), num_examples=1)
    assert not aggregator.poll()
    clock.now += 30
    assert aggregator.poll()
    assert aggregator.completed_rounds == 2


def test_invalid_updates_are_recorded_and_the_round_goes_on() -> None:
    aggregator, _ = make(clients=4)
    poisoned = filled(1)
    poisoned[0][0, 0] = np.nan
    aggregator.submit("c0", 1, poisoned, num_examples=1)
    aggregator.submit("c1", 1, [np.ones((3, 2), np.float32), np.ones(3, np.float32)], num_examples=1)
    aggregator.submit("c2", 1, filled(2), num_examples=1)
    aggregator.submit("c3", 1, filled(4), num_examples=1)
    record = aggregator.history[-1]
    assert record.status == "completed"
    assert record.accepted == ("c2", "c3")
    assert set(record.rejected) == {"c0", "c1"}
    assert all(record.rejected.values())
    np.testing.assert_allclose(aggregator.global_model().weights[0], np.full((2, 3), 3.0))
    assert np.isfinite(aggregator.global_model().weights[0]).all()
    # What a participant may see: counts, and only its own fate.
    status = aggregator.status("c0")
    assert status["history"][0]["rejected"] == 2
    assert status["client"]["last_result"].startswith("rejected")
    assert "c2" not in repr(status)


def test_too_few_valid_updates_rerun_the_round_with_the_model_unchanged() -> None:
    aggregator, _ = make(clients=2)
    aggregator.submit("c0", 1, [np.full_like(w, np.inf) for w in INITIAL], num_examples=1)
    aggregator.submit("c1", 1, filled(5), num_examples=1)
    assert aggregator.completed_rounds == 0
    assert aggregator.history[-1].status == "failed"
    assert aggregator.status()["attempt"] == 2
    np.testing.assert_array_equal(aggregator.global_model().weights[0], INITIAL[0])
    assert not aggregator.has_uploaded("c1")  # everyone trains again
    aggregator.submit("c0", 1, filled(1), num_examples=1)
    aggregator.submit("c1", 1, filled(3), num_examples=1)
    assert aggregator.completed_rounds == 1
    assert aggregator.history[-1].attempt == 2


def test_checkpoint_round_trip_resumes_weights_history_and_strategy_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    aggregator, _ = make(checkpoints=store)
    for round_ in (1, 2):
        for i in range(3):
            aggregator.submit(f"c{i}", round_, filled(round_ * 10 + i), num_examples=1)
    strategy = CountingMean()
    resumed = Aggregator(strategy, INITIAL, rounds=3, min_clients=2, round_timeout_s=60.0, checkpoints=store)
    assert resumed.resumed_from == 2
    assert resumed.completed_rounds == 2
    assert resumed.global_model().round == 3
    assert int(strategy.calls[0]) == 2
    for a, b in zip(resumed.global_model().weights, aggregator.global_model().weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == aggregator.history
    assert resumed.plan.digest == aggregator.plan.digest  # the plan names the *initial* weights


def test_a_resumed_fedadam_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    updates = {
        (r, i): [w + rng.normal(size=w.shape).astype(w.dtype) for w in INITIAL]
        for r in (1, 2, 3)
        for i in (0, 1)
    }

    def play(aggregator: Aggregator, rounds: Sequence[int]) -> None:
        for round_ in rounds:
            for i in (0, 1):
                aggregator.submit(f"c{i}", round_, updates[(round_, i)], num_examples=i + 1)

    straight, _ = make(clients=2, strategy=FedAdam(eta=0.05))
    play(straight, (1, 2, 3))
    store = CheckpointStore(tmp_path, KEY)
    first, _ = make(clients=2, strategy=FedAdam(eta=0.05), checkpoints=store)
    play(first, (1, 2))
    resumed, _ = make(clients=2, strategy=FedAdam(eta=0.05), checkpoints=store)  # the optimizer moments too
    play(resumed, (3,))
    assert resumed.resumed_from == 2
    for a, b in zip(resumed.global_model().weights, straight.global_model().weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tampered_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    aggregator, _ = make(checkpoints=store)
    for i in range(3):
        aggregator.submit(f"c{i}", 1, filled(i), num_examples=1)
    sealed = store.path.read_bytes()
    tampered = bytearray(sealed)
    tampered[-40] ^= 1
    store.path.write_bytes(bytes(tampered))
    with pytest.raises(DecryptionError):
        make(checkpoints=store)
    store.path.write_bytes(sealed)
    with pytest.raises(DecryptionError):  # another key (not released to this aggregator)
        make(checkpoints=CheckpointStore(tmp_path, KeyHandle.generate("fl-checkpoint")))
    with pytest.raises(ConfigurationError, match="training plan"):  # another plan
        make(checkpoints=store, rounds=5)
    assert make(checkpoints=store)[0].resumed_from == 1


def test_in_process_participants_run_the_whole_plan() -> None:
    aggregator, tokens = make(clients=3, strategy=FedAvg())
    seen: list[int] = []

    def run(client_id: str) -> None:
        def train(weights: Weights, config: dict[str, Any]) -> TrainResult:
            return TrainResult(
                [w + int(client_id[1]) + 1 for w in weights], num_examples=int(client_id[1]) + 1
            )

        connection = InProcessConnection(aggregator, tokens[client_id])
        hook = (lambda m: seen.append(m.completed_rounds)) if client_id == "c0" else None
        participate(connection, train, wait_s=5.0, on_round=hook)

    threads = [threading.Thread(target=run, args=(c,)) for c in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert aggregator.finished
    assert seen == [0, 1, 2, 3]
    # Weighted by examples (1, 2, 3): each round adds (1*1 + 2*2 + 3*3) / 6.
    np.testing.assert_allclose(aggregator.global_model().weights[1], np.full(3, 3 * 14 / 6), rtol=1e-6)


def test_plan_identity_and_wire_format() -> None:
    plan = make()[0].plan
    assert TrainingPlan.from_dict(plan.to_dict()) == plan
    assert TrainingPlan.from_dict(plan.to_dict()).digest == plan.digest
    assert make(min_clients=3)[0].plan.digest != plan.digest
    assert plan.initial_weights_sha256 == weights_sha256(INITIAL)
    with pytest.raises(ConfigurationError):
        TrainingPlan.from_dict({**plan.to_dict(), "min_clients": 0})
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=">i8"), np.array(7)]
    update = decode_update(encode_update(4, weights, 7, {"loss": 0.5}))
    assert (update.round, update.num_examples, update.metrics) == (4, 7, {"loss": 0.5})
    np.testing.assert_array_equal(update.weights[1], [1, 2])
    assert update.weights[2].shape == ()  # 0-d arrays stay 0-d (BatchNorm's num_batches_tracked)
    assert update.weights[1].dtype == np.dtype("<i8")
    assert update.weights[0].flags.writeable
    message = make()[0].global_model("c0")
    assert decode_model(encode_model(message)).plan_sha256 == plan.digest
    with pytest.raises(InvalidUpdateError):
        encode_update(1, [np.array(["text"])], 1, {})
    with pytest.raises(InvalidUpdateError):
        decode_update(encode_update(1, weights, 1, {})[:-3])
    with pytest.raises(InvalidUpdateError):
        decode_update(b"\xa1av\x02")


def test_torch_state_dict_round_trip() -> None:
    torch = pytest.importorskip("torch")
    from enclaveml.fl.client import state_dict_to_weights, weights_to_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    weights = state_dict_to_weights(model)
    assert [w.shape for w in weights] == [(3, 4), (3,), (3,), (3,), (3,), (3,), ()]
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    other.load_state_dict(weights_to_state_dict(weights, other))
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigurationError):
        weights_to_state_dict(weights[:-1], other)


def test_example_counts_and_metrics_no_float_can_hold_are_refused_on_arrival() -> None:
    """10**400 fits CBOR (a bignum) and Python ints, not the float64 the round closes with."""
    aggregator, _ = make(clients=2)
    for examples, metrics in (
        (10**400, {}),
        (2**53 + 1, {}),
        (1, {"loss": 10**400}),
        (1, {"loss": float("nan")}),
        (1, {f"m{i}": 0.0 for i in range(65)}),  # a metrics map pinned until the round closes
        (1, {"x" * 65: 0.0}),
    ):
        with pytest.raises(InvalidUpdateError):
            aggregator.submit("c0", 1, filled(1), num_examples=examples, metrics=metrics)
        with pytest.raises(InvalidUpdateError):  # and over the wire, before the aggregator
            decode_update(_update_bytes(examples, metrics))
    aggregator.submit("c0", 1, filled(1), num_examples=2**53, metrics={f"m{i}": 0.5 for i in range(64)})
    aggregator.submit("c1", 1, filled(3), num_examples=1, metrics={"loss": 1e300})
    assert aggregator.completed_rounds == 1  # the round closed; nothing overflowed


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**64], [0, 2**40, 2**40], [2**41]])
def test_shapes_numpy_cannot_hold_are_invalid_updates(shape: list[int]) -> None:
    body = {"v": 1, "round": 1, "num_examples": 1, "metrics": {}, "weights": [["<f4", shape, b""]]}
    with pytest.raises(InvalidUpdateError, match="shape"):
        decode_update(bytes(cbor2.dumps(body, canonical=True)))


def test_an_upload_rejected_on_arrival_keeps_no_metrics() -> None:
    aggregator, _ = make(clients=2)
    aggregator.submit("c0", 1, [], num_examples=1, metrics={"loss": 0.5})  # wrong layout: rejected
    upload = aggregator._round.committed["c0"]
    assert upload.reason is not None
    assert upload.metrics == {}


def _update_bytes(examples: int, metrics: dict[str, Any]) -> bytes:
    body = {
        "v": 1,
        "round": 1,
        "num_examples": examples,
        "metrics": metrics,
        "weights": weights_item(filled(1)),
    }
    return bytes(cbor2.dumps(body, canonical=True))


class NeedsFive(CountingMean):
    """A strategy that refuses rounds with fewer than five updates (as Krum does below 2f + 3)."""

    name = "needs-five"

    def aggregate_train(
        self, server_round: int, global_weights: Weights, updates: Sequence[ClientUpdate]
    ) -> Weights:
        if len(updates) < 5:
            raise ConfigurationError(f"{self.name} needs 5 updates, got {len(updates)}")
        return super().aggregate_train(server_round, global_weights, updates)


def test_a_strategy_that_fails_on_a_round_fails_that_attempt_not_the_aggregator() -> None:
    aggregator, _ = make(clients=2, strategy=NeedsFive())
    aggregator.submit("c0", 1, filled(1), num_examples=1)
    aggregator.submit("c1", 1, filled(3), num_examples=1)  # closes the round: the strategy raises
    assert aggregator.history[-1].status == "failed"
    assert aggregator.status()["attempt"] == 2  # a fresh attempt is open
    assert aggregator.global_model().round == 1
    aggregator.submit("c0", 1, filled(1), num_examples=1)  # and takes uploads again


def test_a_checkpoint_that_cannot_be_saved_does_not_fail_the_round(tmp_path: Path) -> None:
    class Unwritable(CheckpointStore):
        def save(self, checkpoint: Any) -> None:
            raise DecryptionError("the key broker is unreachable")

    aggregator, _ = make(clients=2, checkpoints=Unwritable(tmp_path, KEY))
    aggregator.submit("c0", 1, filled(1), num_examples=1)
    aggregator.submit("c1", 1, filled(3), num_examples=1)  # closes round 1; the save fails
    assert aggregator.completed_rounds == 1
    assert aggregator.global_model().round == 2


def test_participants_do_not_see_other_clients_data_sizes_or_metrics() -> None:
    """With two clients, a round's example total and weighted metrics would reveal the other's."""
    aggregator, _ = make(clients=2)
    aggregator.submit("c0", 1, filled(1), num_examples=123, metrics={"loss": 0.25})
    aggregator.submit("c1", 1, filled(3), num_examples=456, metrics={"loss": 0.75})
    (record,) = aggregator.status("c0")["history"]
    assert set(record) == {"round", "attempt", "status", "accepted", "rejected"}
    assert "579" not in repr(aggregator.status("c0"))
    assert aggregator.history[0].num_examples == 579  # the operator's view keeps them


def test_a_plan_that_names_its_participants_enrols_exactly_them() -> None:
    tokens = {"a": "token-a", "b": "token-b", "c": "token-c"}
    pins = {name: token_sha256(token).hex() for name, token in tokens.items()}
    aggregator, _ = make(clients=0, participants=pins)
    assert aggregator.enrolled == {"a", "b", "c"}
    assert aggregator.plan.participants == pins
    assert all(aggregator.authenticate(token) == name for name, token in tokens.items())
    # The host cannot add a client of its own, nor swap a participant's credential.
    with pytest.raises(ConfigurationError, match="names its participants"):
        aggregator.enrol("host-client")
    with pytest.raises(ConfigurationError, match="not one of them"):
        aggregator.enrol_hashed("host-client", token_sha256("host-token"))
    with pytest.raises(ConfigurationError, match="not one of them"):
        aggregator.enrol_hashed("a", token_sha256("host-token"))
    with pytest.raises(NotEnrolledError):
        aggregator.authenticate("host-token")
    # Revoking a participant works, and only its own credential brings it back.
    aggregator.revoke("b")
    with pytest.raises(NotEnrolledError):
        aggregator.authenticate("token-b")
    aggregator.enrol_hashed("b", token_sha256("token-b"))
    assert aggregator.authenticate("token-b") == "b"
    # The list is part of the plan's identity, which clients check against their own copy.
    plan = aggregator.plan
    assert TrainingPlan.from_dict(plan.to_dict()) == plan
    assert plan.digest != make(clients=0)[0].plan.digest
    assert (
        plan.digest
        != make(clients=0, participants={**pins, "d": token_sha256("token-d").hex()})[0].plan.digest
    )
    # A plan without participants keeps the digest it had before the field existed.
    assert "participants" not in make(clients=0)[0].plan.to_dict()


@pytest.mark.parametrize(
    ("participants", "message"),
    [
        ({"a": "A" * 64, "b": "b" * 64}, "64 lowercase hex"),
        ({"a": "a" * 63, "b": "b" * 64}, "64 lowercase hex"),
        ({"": "a" * 64, "b": "b" * 64}, "non-empty strings"),
        ({"a": "a" * 64, "b": "a" * 64}, "share one credential"),
        ({"a": "a" * 64}, "exceeds its 1 participants"),
        (["a"], "must map names"),
    ],
)
def test_malformed_participant_lists_are_refused(participants: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(clients=0, participants=participants)


def test_a_client_whose_credential_the_plan_does_not_name_stops_before_connecting(
    sim_verifier, sim_policy
) -> None:
    from enclaveml.fl.client import AggregatorClient

    plan = make(clients=0, participants={"a": token_sha256("token-a").hex(), "b": token_sha256("b").hex()})[
        0
    ].plan
    with pytest.raises(ConfigurationError, match="not one of the participants"):
        # Port 9 (discard) is never dialled: the check comes first.
        AggregatorClient(
            "https://127.0.0.1:9",
            credential="token-x",
            policy=sim_policy,
            verifier=sim_verifier,
            expected_plan=plan,
        )


def test_a_pinned_run_resumes_under_a_plan_with_a_replaced_credential_but_not_other_rules(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path, KEY)
    pins = {name: token_sha256(f"token-{name}").hex() for name in ("a", "b", "c")}
    aggregator, _ = make(clients=0, participants=pins, checkpoints=store)
    for name in ("a", "b", "c"):
        aggregator.submit(name, 1, filled(1.0), num_examples=1)
    assert aggregator.completed_rounds == 1
    # "b"'s credential leaked: a new plan names a new one. Participants must accept it (the full
    # digest differs), and the run goes on from its checkpoint.
    rotated = {**pins, "b": token_sha256("token-b-2").hex()}
    resumed, _ = make(clients=0, participants=rotated, checkpoints=store)
    assert resumed.plan.digest != aggregator.plan.digest
    assert resumed.plan.rules_digest == aggregator.plan.rules_digest
    assert resumed.resumed_from == 1
    assert resumed.authenticate("token-b-2") == "b"
    with pytest.raises(NotEnrolledError):
        resumed.authenticate("token-b")
    # Any other rule changed is another run: the checkpoint is refused.
    with pytest.raises(ConfigurationError, match="belongs to training plan"):
        make(clients=0, participants=rotated, checkpoints=store, min_clients=3)
    # A plan without participants keeps digest == rules digest (its checkpoints load as before).
    assert make(clients=0)[0].plan.rules_digest == make(clients=0)[0].plan.digest


def test_big_endian_initial_weights_take_uploads() -> None:
    """Uploads decode little-endian; the aggregator's model must compare equal to them."""
    aggregator = Aggregator(
        FedAvg(), [np.zeros(4, dtype=">f4")], rounds=1, min_clients=2, round_timeout_s=1e9
    )
    for i in range(2):
        connection = InProcessConnection(aggregator, aggregator.enrol(f"c{i}"))
        model = connection.fetch_model()
        connection.upload(model.round, [model.weights[0] + 1], 10, {})
    assert aggregator.completed_rounds == 1
    assert aggregator.history[-1].status == "completed"
    np.testing.assert_allclose(aggregator.global_model().weights[0], np.ones(4))


def test_a_request_that_keeps_failing_in_transport_gives_up_at_the_reconnect_deadline() -> None:
    """Reconnecting succeeds each time, the request fails each time: bounded, not an endless loop."""
    import time

    import httpx

    from enclaveml.fl._errors import FederatedError
    from enclaveml.fl.client import AggregatorClient

    client = object.__new__(AggregatorClient)  # no server: the loop's bookkeeping is under test
    client.url, client._reconnect_s, client._http = "https://aggregator.test", 1.5, object()  # type: ignore[assignment]
    reconnects: list[float] = []
    client._connect_until = lambda deadline: reconnects.append(deadline)  # type: ignore[method-assign]

    def fails(http: Any) -> None:
        raise httpx.ReadError("connection reset")

    started = time.monotonic()
    with pytest.raises(FederatedError, match="kept failing the request"):
        client._call(fails)
    assert time.monotonic() - started < 3
    assert 1 <= len(reconnects) <= 3
