"""Vertical FL over real sockets on 127.0.0.1: the RA-TLS server drives, verified parties answer."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from enclaveml.attestation import AllOf, DebugMode, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.errors import PolicyRejectedError
from enclaveml.fl.vertical._channel import InProcessChannel, PartyChannel, PartyEndpoint
from enclaveml.fl.vertical._codec import decode
from enclaveml.fl.vertical._errors import VerticalError
from enclaveml.fl.vertical._session import VerticalSession, token_sha256
from enclaveml.fl.vertical.logreg import LogRegParams, LogRegParty, predict_logreg, train_logreg
from enclaveml.fl.vertical.party import JobOutcome, ServerConnection
from enclaveml.fl.vertical.plan import VerticalPlan
from enclaveml.fl.vertical.server import serve_vertical

ENTRY_POINT = "enclaveml vfl server"
PARTIES = ("bank", "insurer", "telco")


def policy_for(provider: SimulationProvider) -> UnsafeAllowSimulation:
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([provider.measurement]), DebugMode()))


class Running:
    def __init__(
        self, sim_key: SimulationKey, plan: VerticalPlan, job: Callable[[Sequence[PartyChannel]], Any]
    ):
        self.plan = plan
        self.tokens = {p: secrets.token_urlsafe(16) for p in plan.parties}
        self.session = VerticalSession(
            plan, {p: token_sha256(t) for p, t in self.tokens.items()}, job, connect_timeout_s=60, record=True
        )
        self.provider = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=plan.to_dict())
        self.server = serve_vertical(self.session, self.provider)
        self.verifier = SimulationVerifier(sim_key.public_key())
        self.policy = policy_for(self.provider)

    def connect(self, party: str, **kwargs: Any) -> ServerConnection:
        options: dict[str, Any] = {
            "policy": self.policy,
            "verifier": self.verifier,
            "expected_plan": self.plan,
        }
        options.update(kwargs)
        return ServerConnection(self.server.url, credential=self.tokens[party], **options)

    def run_parties(self, endpoints: dict[str, PartyEndpoint]) -> dict[str, JobOutcome]:
        def one(name: str) -> JobOutcome:
            with self.connect(name) as connection:
                return connection.serve(endpoints[name], record=True)

        with ThreadPoolExecutor(len(endpoints)) as pool:
            futures = {name: pool.submit(one, name) for name in endpoints}
            return {name: f.result(timeout=120) for name, f in futures.items()}


@pytest.fixture
def cancer_split() -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return [(x_train, y_train), (x_test, y_test)]


def logreg_parties(cancer_split: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, LogRegParty]:
    (x_train, y_train), (x_test, _) = cancer_split
    columns = np.array_split(np.arange(x_train.shape[1]), len(PARTIES))
    return {
        name: LogRegParty(
            name, x_train[:, c], labels=y_train if i == 0 else None, datasets={"test": x_test[:, c]}
        )
        for i, (name, c) in enumerate(zip(PARTIES, columns, strict=True))
    }


@pytest.fixture
def logreg_job() -> Callable[[Sequence[PartyChannel]], Any]:
    def job(channels: Sequence[PartyChannel]) -> Any:
        training = train_logreg(channels[0], channels[1:], LogRegParams(max_iter=300))
        return training, predict_logreg(channels[0], channels[1:], "test")

    return job


def test_logreg_over_ratls_matches_in_process_training(
    sim_key: SimulationKey, cancer_split, logreg_job
) -> None:
    plan = VerticalPlan(task="train", parties=PARTIES, algorithm="logreg", params={"max_iter": 300})
    running = Running(sim_key, plan, logreg_job)
    try:
        outcomes = running.run_parties(dict(logreg_parties(cancer_split)))
        assert running.session.wait(30)
    finally:
        running.server.stop()
    assert running.session.state == "succeeded", running.session.error
    assert all(o.succeeded for o in outcomes.values())
    training, probabilities = running.session.result
    # The same protocol over in-process channels gives the same model to the last bit.
    local = [InProcessChannel(p) for p in logreg_parties(cancer_split).values()]
    reference = train_logreg(local[0], local[1:], LogRegParams(max_iter=300))
    assert training.losses == reference.losses
    np.testing.assert_array_equal(probabilities, predict_logreg(local[0], local[1:], "test"))
    y_test = cancer_split[1][1]
    assert ((probabilities > 0.5) == y_test).mean() > 0.93

    # What crossed: the server received partial logits and step sizes, never a feature column;
    # passive parties never received a label array (the residuals they get are discussed in docs).
    (x_train, y_train) = cancer_split[0]
    for name in PARTIES:
        for exchange in running.session.channels[name].transcript:
            answer = decode(exchange.response)["ok"]
            # (model_id: the random id of the run a share comes from, with the partial logits)
            assert set(answer) <= {"rows", "features", "labels", "step_sq", "z", "model_id"}
            if "labels" in answer:
                assert name == "bank"
            for value in answer.values():
                if isinstance(value, np.ndarray) and value.shape == y_train.shape:
                    assert not any(np.allclose(value, column) for column in x_train.T)
    for name in PARTIES[1:]:
        for exchange in outcomes[name].transcript:
            request = decode(exchange.request)
            assert "labels" not in request
            for value in request.values():
                if isinstance(value, np.ndarray) and value.shape == y_train.shape:
                    assert not np.array_equal(value, y_train)


def test_party_refuses_a_server_running_another_plan(sim_key: SimulationKey, logreg_job) -> None:
    plan = VerticalPlan(task="train", parties=PARTIES, algorithm="logreg", params={"max_iter": 300})
    running = Running(sim_key, plan, logreg_job)
    other = VerticalPlan(task="train", parties=PARTIES, algorithm="logreg", params={"max_iter": 301})
    try:
        with pytest.raises(PolicyRejectedError, match="job-plan"):
            running.connect("insurer", expected_plan=other)
        stats = running.server.app.state.stats
        assert stats.requests() == 0  # the check failed on the certificate: not one HTTP request
    finally:
        running.server.stop()


def test_stopping_the_server_cancels_a_job_still_waiting_for_its_parties(
    sim_key: SimulationKey, logreg_job, caplog: pytest.LogCaptureFixture
) -> None:
    plan = VerticalPlan(task="train", parties=PARTIES, algorithm="logreg", params={"max_iter": 300})
    running = Running(sim_key, plan, logreg_job)  # waits up to 60 s for parties that never come
    with running.connect("bank"):
        pass  # one party came and went; the others never connect

    def long_poll() -> None:  # the server's side is under test here: TLS without pinning will do
        with httpx.Client(base_url=running.server.url, verify=False, timeout=60) as http:
            auth = {"Authorization": f"Bearer {running.tokens['bank']}"}
            http.get("/v1/vfl/calls", params={"wait_s": 30}, headers=auth)

    polling = threading.Thread(target=long_poll)
    polling.start()
    time.sleep(0.5)
    started = time.monotonic()
    running.server.stop()  # cancels first: the long-poll ends, it is not waited out (30 s)
    assert time.monotonic() - started < 5
    assert not running.server.thread.is_alive()
    polling.join(10)
    assert running.session.wait(5), "the job outlived its server"  # it would wait 60 s
    assert running.session.state == "cancelled"
    assert running.session.outcome()["state"] == "cancelled"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a cancelled job is not a failure"
    running.session.cancel()  # after the end: nothing changes
    assert running.session.state == "cancelled"


def test_unknown_credential_and_foreign_answers_are_refused(sim_key: SimulationKey) -> None:
    plan = VerticalPlan(task="psi", parties=("a", "b"))
    gate: list[str] = []

    def job(channels: Sequence[PartyChannel]) -> Any:
        gate.append("started")
        return [ch.call("echo.ping", {"n": i}) for i, ch in enumerate(channels)]

    running = Running(sim_key, plan, job)
    try:
        with running.connect("a") as connection:
            http = connection._http
            bad = http.get("/v1/vfl/calls", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401
            foreign = http.post(
                f"/v1/vfl/calls/{'0' * 32}",
                content=b"\xa0",
                headers={"Authorization": f"Bearer {running.tokens['a']}"},
            )
            assert foreign.status_code == 409
            # Refused before the body is read: a party cannot make the TEE buffer large bodies.
            stats, before = running.server.app.state.stats, running.server.app.state.stats.request_bytes()
            large = http.post(
                f"/v1/vfl/calls/{'1' * 32}",
                content=bytes(8 << 20),
                headers={"Authorization": f"Bearer {running.tokens['a']}"},
            )
            assert large.status_code == 409
            assert stats.request_bytes() - before < 1 << 20
        echo = {name: PartyEndpoint(name, {"echo.ping": lambda p: {"pong": p["n"]}}) for name in plan.parties}
        outcomes = running.run_parties(echo)
        assert running.session.wait(10)
    finally:
        running.server.stop()
    assert running.session.result == [{"pong": 0}, {"pong": 1}]
    assert all(o.state == "succeeded" and o.calls == 1 for o in outcomes.values())


def test_a_server_gone_while_a_party_computes_is_a_vertical_error(sim_key: SimulationKey) -> None:
    """The answer's upload fails in transport: a typed error the CLI reports, not a traceback."""
    plan = VerticalPlan(task="psi", parties=("a", "b"))
    running = Running(sim_key, plan, lambda channels: [ch.call("echo.ping", {}) for ch in channels])
    stopped = threading.Event()

    def slow(payload: Any) -> dict[str, Any]:
        if not stopped.is_set():
            stopped.set()
            running.server.stop(2)  # the host restarts the server while party 'a' computes
        return {}

    def serve_b() -> None:
        with contextlib.suppress(VerticalError), running.connect("b") as connection:
            connection.serve(PartyEndpoint("b", {"echo.ping": lambda p: {}}))

    threading.Thread(target=serve_b, daemon=True).start()
    with running.connect("a") as connection, pytest.raises(VerticalError, match="went away"):
        connection.serve(PartyEndpoint("a", {"echo.ping": slow}))
    running.session.cancel()


def test_a_party_error_text_is_only_ever_a_type_name() -> None:
    """Text a party puts in its error answer never reaches the server's log or the outcomes."""
    from enclaveml.fl.vertical._channel import unwrap
    from enclaveml.fl.vertical._codec import encode
    from enclaveml.fl.vertical._errors import PartyFailedError

    with pytest.raises(PartyFailedError, match=r"failed 'm': ValueError$"):
        unwrap("p", "m", encode({"error": "ValueError"}))
    forged = "x\nERROR enclaveml: label party bank sent labels 0,1,1,0"
    with pytest.raises(PartyFailedError) as caught:
        unwrap("p", "m", encode({"error": forged}))
    assert "labels" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_server_stays_until_every_party_has_its_outcome(sim_key: SimulationKey) -> None:
    """A party 150 ms away polls once more after the job ends: the server waits for it (as the CLI does)."""
    plan = VerticalPlan(task="psi", parties=("a", "b"))
    running = Running(sim_key, plan, lambda channels: [ch.call("echo.ping", {}) for ch in channels])

    def server_main() -> None:  # what `enclaveml vfl server` does once serving
        running.session.wait()
        assert running.session.wait_told(30)
        running.server.stop(timeout=5.0)

    threading.Thread(target=server_main, daemon=True).start()

    def party(name: str) -> str:
        with running.connect(name) as connection:
            if name == "b":
                connection._http.event_hooks = {"request": [lambda request: time.sleep(0.15)]}
            return connection.serve(PartyEndpoint(name, {"echo.ping": lambda p: {}})).state

    with ThreadPoolExecutor(2) as pool:
        states = list(pool.map(party, plan.parties))
    assert states == ["succeeded", "succeeded"]
