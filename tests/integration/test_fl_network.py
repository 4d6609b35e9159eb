"""Federated learning over real sockets on 127.0.0.1: RA-TLS aggregator, verifying clients, kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from enclaveml.attestation import AllOf, DebugMode, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import (
    SimulationKey,
    SimulationProvider,
    SimulationVerifier,
    _package_digest,
)
from enclaveml.crypto import KeyHandle, read_header
from enclaveml.errors import PolicyRejectedError
from enclaveml.fl._errors import NotEnrolledError
from enclaveml.fl._wire import UPDATE_CONTENT_TYPE, encode_update
from enclaveml.fl.aggregator import Aggregator, token_sha256
from enclaveml.fl.client import AggregatorClient, Trainer, TrainResult, participate
from enclaveml.fl.plan import TrainingPlan
from enclaveml.fl.server import serve_aggregator
from enclaveml.fl.strategies import CoordinateMedian, FedAvg
from enclaveml.fl.strategy import Weights
from enclaveml.serving.secure import RunningServer
from tests.fl_aggregator_process import ENTRY_POINT, digits_aggregator
from tests.fl_digits import (
    accuracy,
    digits,
    dirichlet_split,
    initial_weights,
    mlp,
    train,
    trainer,
)

CLIENTS = 5
EPOCHS = 5


def policy_for(provider: SimulationProvider) -> UnsafeAllowSimulation:
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([provider.measurement]), DebugMode()))


def local_data() -> list[tuple[np.ndarray, np.ndarray]]:
    """Label-skewed (Dirichlet 1.0) shares of the digits training set, one per client."""
    x_train, _, y_train, _ = digits()
    return [(x_train[p], y_train[p]) for p in dirichlet_split(y_train, CLIENTS, alpha=1.0, seed=0)]


@pytest.fixture
def running(sim_key: SimulationKey) -> Iterator[tuple[Aggregator, SimulationProvider, RunningServer]]:
    aggregator = digits_aggregator()
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=aggregator.plan.to_dict())
    server = serve_aggregator(aggregator, provider)
    yield aggregator, provider, server
    server.stop()


def run_clients(
    url: str,
    tokens: dict[str, str],
    trainers: dict[str, Trainer],
    *,
    policy: Any,
    verifier: SimulationVerifier,
    plan: dict[str, Any],
    on_round: Callable[[Any], object] | None = None,
) -> dict[str, Any]:
    """Every client in its own thread, as its own verified connection; returns each final model."""

    def one(client_id: str) -> Any:
        with AggregatorClient(
            url,
            credential=tokens[client_id],
            policy=policy,
            verifier=verifier,
            expected_plan=plan,
            reconnect_s=60,
        ) as connection:
            hook = on_round if client_id == "c0" else None
            return participate(connection, trainers[client_id], wait_s=5.0, on_round=hook)

    with ThreadPoolExecutor(len(tokens)) as pool:
        futures = {c: pool.submit(one, c) for c in tokens}
        return {c: f.result(timeout=120) for c, f in futures.items()}


def test_five_clients_ten_rounds_reach_centralized_accuracy(
    running, sim_verifier: SimulationVerifier
) -> None:
    aggregator, provider, server = running
    _, x_test, _, y_test = digits()
    tokens = {f"c{i}": aggregator.enrol(f"c{i}") for i in range(CLIENTS)}
    data = local_data()
    trainers = {f"c{i}": trainer(x, y, epochs=EPOCHS, seed=i) for i, (x, y) in enumerate(data)}
    curve: list[float] = []
    finals = run_clients(
        server.url,
        tokens,
        trainers,
        policy=policy_for(provider),
        verifier=sim_verifier,
        plan=aggregator.plan.to_dict(),
        on_round=lambda m: curve.append(accuracy(m.weights, x_test, y_test)),
    )
    federated = accuracy(finals["c0"].weights, x_test, y_test)
    centralized_model = mlp(0)
    x_train, _, y_train, _ = digits()
    train(centralized_model, x_train, y_train, epochs=20, seed=1)
    centralized = accuracy(centralized_model, x_test, y_test)
    assert aggregator.completed_rounds == 10
    assert len(curve) == 11
    assert federated >= centralized - 0.02, (federated, centralized, curve)
    assert all(r.accepted == tuple(tokens) for r in aggregator.history)
    stats = server.app.state.stats
    assert stats.requests("/attestation") == CLIENTS
    assert stats.requests("/v1/fl/rounds/{round_}/update") == 50


def test_a_client_that_rejects_the_aggregator_sends_nothing(
    sim_key: SimulationKey, sim_verifier: SimulationVerifier
) -> None:
    aggregator = digits_aggregator()
    # As on hardware: the measurement covers the code only; the plan is bound through RA-TLS.
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config={"code": "only"})
    server = serve_aggregator(aggregator, provider)
    try:
        token = aggregator.enrol("c0")
        stats = server.app.state.stats
        plan = aggregator.plan.to_dict()
        wrong_code = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([b"\x01" * 48])))
        with pytest.raises(PolicyRejectedError, match="measurement"):
            AggregatorClient(
                server.url, credential=token, policy=wrong_code, verifier=sim_verifier, expected_plan=plan
            )
        other_plan = {**plan, "min_clients": 1}  # a plan where one client's update is the aggregate
        with pytest.raises(PolicyRejectedError, match="training-plan"):
            AggregatorClient(
                server.url,
                credential=token,
                policy=policy_for(provider),
                verifier=sim_verifier,
                expected_plan=other_plan,
            )
        assert stats.requests() == 0
        assert stats.request_bytes() == 0
        with pytest.raises(NotEnrolledError):
            AggregatorClient(
                server.url,
                credential="stolen?",
                policy=policy_for(provider),
                verifier=sim_verifier,
                expected_plan=plan,
            )
        assert stats.requests("/v1/fl/enrolment") == 1
        assert stats.status_count(401) == 1
        with AggregatorClient(
            server.url,
            credential=token,
            policy=policy_for(provider),
            verifier=sim_verifier,
            expected_plan=plan,
        ) as good:
            assert good.client_id == "c0"
            assert good.server_plan()["plan"] == plan
        assert stats.request_bytes() == 0  # verification and enrolment carry no body
    finally:
        server.stop()


def test_an_upload_that_would_be_refused_is_refused_before_its_body_is_read(sim_key: SimulationKey) -> None:
    """One credential cannot make the aggregator hold many model-sized bodies at once."""
    aggregator = Aggregator(
        FedAvg(), [np.zeros(50_000, np.float32)], rounds=2, min_clients=2, round_timeout_s=600
    )
    token = aggregator.enrol("c0")
    aggregator.enrol("c1")
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=aggregator.plan.to_dict())
    server = serve_aggregator(aggregator, provider)
    body = encode_update(1, [np.ones(50_000, np.float32)], 1, {})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": UPDATE_CONTENT_TYPE}
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[:1000]
        release.wait(30)
        yield body[1000:]

    stats = server.app.state.stats
    # The server's test of the protocol, not of the client: TLS without pinning is enough here.
    try:
        with httpx.Client(base_url=server.url, verify=False, headers=headers, timeout=60) as http:
            assert http.get("/v1/fl/plan").status_code == 200  # a connection up for the slow upload
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(http.post, "/v1/fl/rounds/1/update", content=slow_body())
                time.sleep(0.3)  # its headers and first bytes are in
                deadline = time.monotonic() + 10
                while True:  # until the first upload is being received
                    second = http.post("/v1/fl/rounds/1/update", content=body)
                    if second.status_code == 503 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                # Not a duplicate (nothing is counted yet): the same update is to be sent again.
                assert (second.status_code, second.headers["Retry-After"]) == (503, "1")
                assert "already being received" in second.json()["error"]
                release.set()
                assert first.result(timeout=30).status_code == 202
            read = stats.request_bytes()
            again = http.post("/v1/fl/rounds/1/update", content=body)
            assert (again.status_code, again.json()["error"]) == (
                409,
                "client 'c0' already uploaded for round 1",
            )
            wrong_round = http.post("/v1/fl/rounds/2/update", content=body)
            assert wrong_round.status_code == 409
            assert stats.request_bytes() - read < len(body)  # neither body was read
    finally:
        release.set()
        server.stop()


class _SlowQuotes(SimulationProvider):
    """Hardware-like evidence latency, so that concurrent connections fill the attestation slots."""

    def collect(self, report_data: bytes) -> Any:
        time.sleep(0.3)
        return super().collect(report_data)


def test_participants_reconnecting_at_once_wait_for_busy_attestation_slots(
    sim_key: SimulationKey, sim_verifier: SimulationVerifier
) -> None:
    """Twelve participants after a restart find the aggregator's 8 attestation slots full (429)."""
    aggregator = Aggregator(FedAvg(), [np.zeros(4, np.float32)], rounds=1, min_clients=2, round_timeout_s=600)
    tokens = {f"c{i}": aggregator.enrol(f"c{i}") for i in range(12)}
    provider = _SlowQuotes(key=sim_key, entry_point=ENTRY_POINT, config=aggregator.plan.to_dict())
    server = serve_aggregator(aggregator, provider)

    def connect(client_id: str) -> str:
        with AggregatorClient(
            server.url,
            credential=tokens[client_id],
            policy=policy_for(provider),
            verifier=sim_verifier,
            expected_plan=aggregator.plan.to_dict(),
            wait_for_aggregator_s=30,
        ) as connection:
            return connection.client_id

    try:
        with ThreadPoolExecutor(len(tokens)) as pool:
            connected = sorted(pool.map(connect, tokens))
        assert connected == sorted(tokens)
        assert server.app.state.stats.status_count(429) > 0  # the slots were full, and waited out
    finally:
        server.stop()


def test_nan_and_scaled_updates_move_the_model_no_further_than_the_median_bound(
    sim_key: SimulationKey, sim_verifier: SimulationVerifier
) -> None:
    aggregator = Aggregator(
        CoordinateMedian(),
        initial_weights(0),
        rounds=3,
        min_clients=3,
        round_timeout_s=60.0,
        model_id="digits-mlp",
        # Without the norm-outlier rule, so the 100x update reaches the median and the bound is its doing.
        validation={"norm_outlier_factor": None},
    )
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=aggregator.plan.to_dict())
    server = serve_aggregator(aggregator, provider)
    tokens = {f"c{i}": aggregator.enrol(f"c{i}") for i in range(CLIENTS)}
    honest_updates: dict[str, list[Weights]] = {f"c{i}": [] for i in range(3)}
    scaled_updates: list[Weights] = []
    data = local_data()

    def honest(client_id: str, x: np.ndarray, y: np.ndarray) -> Trainer:
        inner = trainer(x, y, epochs=EPOCHS, seed=int(client_id[1]))

        def train_round(weights: Weights, config: dict[str, Any]) -> TrainResult:
            result = inner(weights, config)
            honest_updates[client_id].append(result.weights)
            return result

        return train_round

    def scaled(weights: Weights, config: dict[str, Any]) -> TrainResult:
        result = trainer(*data[3], epochs=EPOCHS, seed=3)(weights, config)
        boosted = [100 * w for w in result.weights]
        scaled_updates.append(boosted)
        return TrainResult(boosted, result.num_examples)

    def poisoned(weights: Weights, config: dict[str, Any]) -> TrainResult:
        return TrainResult([np.full_like(w, np.nan) for w in weights], 10_000)

    trainers = {
        **{c: honest(c, *data[i]) for i, c in enumerate(honest_updates)},
        "c3": scaled,
        "c4": poisoned,
    }
    models: dict[int, Weights] = {}
    try:
        run_clients(
            server.url,
            tokens,
            trainers,
            policy=policy_for(provider),
            verifier=sim_verifier,
            plan=aggregator.plan.to_dict(),
            on_round=lambda m: models.setdefault(m.completed_rounds, m.weights),
        )
        with AggregatorClient(
            server.url, credential=tokens["c4"], policy=policy_for(provider), verifier=sim_verifier,
            expected_plan=aggregator.plan.to_dict(),
        ) as attacker:  # fmt: skip
            status = attacker.status()
    finally:
        server.stop()
    assert aggregator.completed_rounds == 3
    assert sorted(models) == [0, 1, 2, 3]
    for record in aggregator.history:
        assert set(record.rejected) == {"c4"}  # NaN: rejected by validation, inside the TEE
        assert "c3" in record.accepted  # the scaled update is "valid"; only the median contains it
        assert record.status == "completed"
    assert status["client"]["last_result"].startswith("rejected")
    for round_ in (1, 2, 3):
        honest_round = np.stack(
            [np.concatenate([w.ravel() for w in honest_updates[c][round_ - 1]]) for c in honest_updates]
        )
        aggregate = np.concatenate([w.ravel() for w in models[round_]])
        low, high = honest_round.min(axis=0), honest_round.max(axis=0)
        assert np.isfinite(aggregate).all()
        assert (aggregate >= low - 1e-6).all()
        assert (aggregate <= high + 1e-6).all()
        # The attack is real: a plain mean of the same four updates lands far outside that range.
        boosted = np.concatenate([w.ravel() for w in scaled_updates[round_ - 1]])
        mean = np.vstack([honest_round, boosted]).mean(axis=0)
        assert float(np.abs(mean - honest_round.mean(axis=0)).max()) > 10 * float((high - low).max())
    _, x_test, _, y_test = digits()
    assert accuracy(models[3], x_test, y_test) > 0.85


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], env: dict[str, str], measurement: bytes) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fl_aggregator_process", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line, "the aggregator process did not start"
        assert line[0] == "ready"
        # Differs only if enclaveml's files changed during the test (the simulated measurement covers them).
        assert line[2] == measurement.hex(), "the aggregator's code changed during the test"
    except BaseException:
        process.kill()  # never leave an aggregator running after a failed start
        process.wait()
        raise
    return process, int(line[1])


def test_kill_9_mid_run_resumes_from_the_sealed_checkpoint_and_finishes(tmp_path: Path) -> None:
    key_path = tmp_path / "sim.pem"
    sim_key = SimulationKey.load_or_create(key_path)
    tokens = {f"c{i}": f"credential-{i}-{os.urandom(8).hex()}" for i in range(CLIENTS)}
    registry = tmp_path / "clients.json"
    registry.write_text(json.dumps({"clients": {c: token_sha256(t).hex() for c, t in tokens.items()}}))
    checkpoints = tmp_path / "checkpoints"
    port = _free_port()
    args = [str(port), str(checkpoints), str(registry), str(key_path)]
    env = {**os.environ, "ENCLAVEML_TEST_FL_KEY": KeyHandle.generate("fl-checkpoint").secret_bytes().hex()}
    plan: TrainingPlan = digits_aggregator().plan
    _package_digest.cache_clear()  # measure the code as the aggregator process will, not as it was
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=plan.to_dict())
    data = local_data()
    trainers = {f"c{i}": trainer(x, y, epochs=EPOCHS, seed=i) for i, (x, y) in enumerate(data)}
    process, resumed = _start(args, env, provider.measurement)
    assert resumed == 0
    killed_after: list[int] = []
    restart_failures: list[BaseException] = []

    def kill_mid_run() -> None:
        nonlocal process
        checkpoint = checkpoints / "checkpoint.sealed"
        deadline = time.monotonic() + 60
        while not (checkpoint.exists() and int(read_header(checkpoint).metadata["completed_rounds"]) >= 3):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_after.append(int(read_header(checkpoint).metadata["completed_rounds"]))
        try:
            process, resumed_from = _start(args, env, provider.measurement)
        except BaseException as exc:  # reported instead of the clients' "unreachable" a minute later
            restart_failures.append(exc)
            raise
        killed_after.append(resumed_from)

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    try:
        try:
            finals = run_clients(
                f"https://127.0.0.1:{port}",
                tokens,
                trainers,
                policy=policy_for(provider),
                verifier=SimulationVerifier(sim_key.public_key()),
                plan=plan.to_dict(),
            )
        except Exception as exc:
            if restart_failures:  # the cause, rather than the clients giving up on it
                raise restart_failures[0] from exc
            raise
        killer.join(10)
        with AggregatorClient(
            f"https://127.0.0.1:{port}", credential=tokens["c0"], policy=policy_for(provider),
            verifier=SimulationVerifier(sim_key.public_key()), expected_plan=plan.to_dict(),
        ) as observer:  # fmt: skip
            final_status = observer.status()
    finally:
        killer.join(60)  # a restart in progress rebinds `process`: kill the one that runs last
        process.kill()
        process.wait()
    assert 3 <= killed_after[0] < 10
    assert killed_after[1] == killed_after[0]
    assert final_status["finished"]
    assert final_status["completed_rounds"] == 10
    assert final_status["resumed_from"] == killed_after[0]
    assert [r["round"] for r in final_status["history"]] == list(range(1, 11))
    _, x_test, _, y_test = digits()
    assert all(m.finished and m.completed_rounds == 10 for m in finals.values())
    assert accuracy(finals["c0"].weights, x_test, y_test) > 0.93


def test_checkpoints_sealed_under_a_broker_key_released_only_to_this_aggregator(
    tmp_path: Path, sim_key: SimulationKey, sim_verifier: SimulationVerifier
) -> None:
    from enclaveml.attestation import EvidenceVerifier
    from enclaveml.errors import KeyReleaseDeniedError
    from enclaveml.fl._checkpoint import CheckpointStore
    from enclaveml.kms._rootkey import RootKey
    from tests.integration.test_kms_release import running_broker

    aggregator = digits_aggregator()
    provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=aggregator.plan.to_dict())
    verifier = EvidenceVerifier(simulation=sim_verifier)
    with running_broker(tmp_path / "kbs.db", RootKey.generate(), verifier, tmp_path / "tls") as broker:
        with broker.admin() as admin:
            admin.create_key("fl-checkpoint", policy_for(provider))
        with broker.client(provider) as keys:
            first = digits_aggregator(CheckpointStore(tmp_path / "ckpt", keys, key_id="fl-checkpoint"))
            for i in range(CLIENTS):
                first.enrol_hashed(f"c{i}", token_sha256(f"t{i}"))
            for i in range(CLIENTS):
                first.submit(f"c{i}", 1, initial_weights(0), num_examples=1)
        assert first.completed_rounds == 1
        with broker.client(provider) as keys:  # a restarted aggregator: a fresh release
            resumed = digits_aggregator(CheckpointStore(tmp_path / "ckpt", keys, key_id="fl-checkpoint"))
        assert resumed.resumed_from == 1
        # Same code, another plan (min_clients 1): another measurement, so no key and no resume.
        greedy = Aggregator(FedAvg(), initial_weights(0), rounds=10, min_clients=1, model_id="digits-mlp")
        other = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=greedy.plan.to_dict())
        with broker.client(other) as keys, pytest.raises(KeyReleaseDeniedError):
            keys.release("fl-checkpoint")
