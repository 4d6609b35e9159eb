"""End to end: sealed model → key released after attestation → RA-TLS server → verifying client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclaveml.attestation import AllOf, MeasurementAllowlist, UnsafeAllowSimulation, attest_server
from enclaveml.attestation.ratls import NO_EXPIRY
from enclaveml.attestation.simulation import SimulationProvider, SimulationVerifier
from enclaveml.crypto import KeyHandle, seal_file
from enclaveml.errors import AttestationError, ConfigurationError, PolicyRejectedError
from enclaveml.serving.client import AsyncClient, Client
from enclaveml.serving.secure import (
    BATCHABLE_METADATA,
    MODEL_NAME_METADATA,
    RunningServer,
    load_sealed_models,
    serve_in_thread,
)
from tests.serving_models import digits_model

CANARY_KEY = KeyHandle.generate("digits-key")


@pytest.fixture
def sealed_model(tmp_path: Path) -> Path:
    model_bytes, _, _ = digits_model()
    plain = tmp_path / "digits.onnx"
    plain.write_bytes(model_bytes)
    sealed = tmp_path / "digits.sealed"
    seal_file(plain, sealed, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx")
    plain.unlink()
    return sealed


@pytest.fixture
def server(sealed_model: Path, sim_provider: SimulationProvider) -> Iterator[RunningServer]:
    repository = load_sealed_models({"digits": sealed_model}, CANARY_KEY, intra_op_threads=1)
    running = serve_in_thread(repository, sim_provider)
    yield running
    running.stop()


def test_verified_client_predicts_like_onnxruntime(
    server: RunningServer, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    model_bytes, x_test, y_test = digits_model()
    expected = ort.InferenceSession(model_bytes).run(None, {"X": x_test[:50]})[0]
    with Client(server.url, policy=sim_policy, verifier=sim_verifier) as client:
        assert client.claims.simulated
        result = client.infer("digits", {"X": x_test[:50]})
        assert (
            client.certificate_fingerprint
            == server.ratls.certificate.fingerprint(
                __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()
            ).hex()
        )
        label = next(iter(result.values())) if "label" not in result else result["label"]
        np.testing.assert_array_equal(result["label"], expected)
        assert (label == y_test[:50]).mean() > 0.9
        # A single array works for single-input models.
        assert client.infer("digits", x_test[:3])["label"].shape == (3,)


def test_a_server_that_has_run_for_years_is_still_attested_and_used(
    server: RunningServer, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    # The certificate's trust is its evidence and the per-connection nonce, not a validity
    # period: a server that has run for a long time must still be reachable (it once expired
    # after a day, and clients pin the exact certificate, so re-issuing it cannot help them).
    assert server.ratls.certificate.not_valid_after_utc == NO_EXPIRY
    years_later = time.time() + 3 * 365 * 86400
    _, x_test, _ = digits_model()
    with Client(server.url, policy=sim_policy, verifier=sim_verifier, now=years_later) as client:
        assert client.infer("digits", x_test[:2])["label"].shape == (2,)


def test_a_standard_client_checking_host_names_accepts_the_attested_certificate(
    server: RunningServer, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    # As docs/serving.md tells standard clients (tritonclient, curl) to do: attest, then trust
    # exactly that certificate, with the usual host-name check on, by IP address or by name.
    attested = attest_server(server.url, verifier=sim_verifier, policy=sim_policy)
    pem = x509.load_der_x509_certificate(attested.peer.certificate_der).public_bytes(
        serialization.Encoding.PEM
    )
    context = ssl.create_default_context(cadata=pem.decode())
    assert context.check_hostname
    port = server.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "localhost"):
        with httpx.Client(verify=context) as http:
            assert http.get(f"https://{host}:{port}/v2/health/live").status_code == 200


def test_client_refuses_server_outside_policy_and_sends_no_body(
    server: RunningServer, sim_verifier: SimulationVerifier
) -> None:
    stats = server.app.state.stats
    before = stats.requests()
    wrong = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([b"\x00" * 48])))
    with pytest.raises(PolicyRejectedError, match="measurement"):
        Client(server.url, policy=wrong, verifier=sim_verifier)
    # The refused client fetched the certificate (a TLS handshake) and sent no HTTP request at all.
    assert stats.requests() == before
    assert stats.request_bytes() == 0


@contextlib.contextmanager
def replaying_attestation(server: RunningServer, how: str = "replayed") -> Iterator[None]:
    """The server's fresh evidence stops verifying: it ignores the nonce, as a replay would; or
    (``stalled``) it never comes, as when the host stalls quote generation past the client's timeout."""
    state = server.app.state.serving
    honest = state.attestation
    if how == "stalled":
        state.attestation = lambda nonce: time.sleep(2.5) or honest(nonce)
    else:
        state.attestation = lambda nonce: honest(b"\x01" * 32)
    try:
        yield
    finally:
        state.attestation = honest


@pytest.mark.parametrize("how", ["replayed", "stalled"])
def test_after_a_failed_reattestation_the_client_sends_nothing_until_one_passes(
    server: RunningServer, sim_verifier: SimulationVerifier, sim_policy, how: str
) -> None:
    rows = digits_model()[1][:2]
    with Client(server.url, policy=sim_policy, verifier=sim_verifier, timeout=1.0) as client:
        assert client.infer("digits", {"X": rows})["label"].shape == (2,)
        with replaying_attestation(server, how):
            with pytest.raises(AttestationError):
                client.reattest()
            stats = server.app.state.stats
            requests, body_bytes = stats.requests(), stats.request_bytes()
            with pytest.raises(AttestationError, match="nothing is sent"):
                client.infer("digits", {"X": rows})
            with pytest.raises(AttestationError, match="nothing is sent"):
                client.model_metadata("digits")
            assert (stats.requests(), stats.request_bytes()) == (requests, body_bytes)
        client.reattest()
        assert client.infer("digits", {"X": rows})["label"].shape == (2,)


@pytest.mark.parametrize("how", ["replayed", "stalled"])
def test_the_async_client_refuses_too_after_a_failed_reattestation(
    server: RunningServer, sim_verifier: SimulationVerifier, sim_policy, how: str
) -> None:
    rows = digits_model()[1][:2]

    async def scenario() -> None:
        client = await AsyncClient.connect(server.url, policy=sim_policy, verifier=sim_verifier, timeout=1.0)
        try:
            assert (await client.infer("digits", {"X": rows}))["label"].shape == (2,)
            with replaying_attestation(server, how):
                with pytest.raises(AttestationError):
                    await client.reattest()
                with pytest.raises(AttestationError, match="nothing is sent"):
                    await client.infer("digits", {"X": rows})
        finally:
            await client.aclose()

    asyncio.run(scenario())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_a_server_on_an_ipv6_address_is_attested_and_used(
    sealed_model: Path, sim_provider: SimulationProvider, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    repository = load_sealed_models({"digits": sealed_model}, CANARY_KEY, intra_op_threads=1)
    running = serve_in_thread(repository, sim_provider, host="::1")
    try:
        assert running.url.startswith("https://[::1]:")
        with Client(running.url, policy=sim_policy, verifier=sim_verifier) as client:
            assert client.infer("digits", {"X": digits_model()[1][:2]})["label"].shape == (2,)
    finally:
        running.stop()


def _centring_model() -> bytes:
    """y = x - mean(x, axis=0): dim 0 is dynamic but a set axis, not a batch of independent rows."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        "centre",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())


def test_requests_of_different_clients_are_batched_only_if_the_owner_sealed_it_batchable(
    tmp_path: Path, sim_provider: SimulationProvider, sim_policy, sim_verifier: SimulationVerifier
) -> None:
    """Batched with another client's rows, a set model answers from both inputs (a leak)."""
    plain = tmp_path / "centre.onnx"
    plain.write_bytes(_centring_model())
    sealed, batchable = tmp_path / "centre.sealed", tmp_path / "centre-batchable.sealed"
    seal_file(plain, sealed, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx")
    seal_file(plain, batchable, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx",
              metadata={BATCHABLE_METADATA: "true"})  # fmt: skip
    assert load_sealed_models({"centre": batchable}, CANARY_KEY, intra_op_threads=1).get("centre").batchable
    repository = load_sealed_models({"centre": sealed}, CANARY_KEY, intra_op_threads=1)
    assert not repository.get("centre").batchable
    running = serve_in_thread(repository, sim_provider, max_batch_size=16, max_delay_ms=50)
    try:
        victim, other = np.array([[11.0, 22.0, 33.0, 44.0]], np.float32), np.zeros((1, 4), np.float32)
        with (
            Client(running.url, policy=sim_policy, verifier=sim_verifier) as client,
            ThreadPoolExecutor(8) as pool,
        ):
            answers = list(pool.map(lambda x: client.infer("centre", {"x": x})["y"], [victim, other] * 8))
        for answer in answers:  # each request alone: one row minus its own mean
            np.testing.assert_array_equal(answer, np.zeros((1, 4), np.float32))
    finally:
        running.stop()
    bad = tmp_path / "bad.sealed"
    seal_file(plain, bad, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx",
              metadata={BATCHABLE_METADATA: "yes"})  # fmt: skip
    with pytest.raises(ConfigurationError, match="batchable='yes'"):
        load_sealed_models({"centre": bad}, CANARY_KEY, intra_op_threads=1)


def test_a_sealed_model_loads_only_under_the_name_it_was_sealed_as(tmp_path: Path) -> None:
    """The host controls the files: swapping two sealed models between their names is refused."""
    plain = tmp_path / "model.onnx"
    plain.write_bytes(digits_model()[0])
    fraud, anonymous, text = tmp_path / "fraud.sealed", tmp_path / "any.sealed", tmp_path / "text.sealed"
    seal_file(plain, fraud, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx",
              metadata={MODEL_NAME_METADATA: "fraud"})  # fmt: skip
    seal_file(plain, anonymous, wrapper=CANARY_KEY, key_id="digits-key", content_type="application/onnx")
    seal_file(plain, text, wrapper=CANARY_KEY, key_id="digits-key", content_type="text/csv")

    assert load_sealed_models({"fraud": fraud}, CANARY_KEY, intra_op_threads=1).get("fraud").name == "fraud"
    with pytest.raises(ConfigurationError, match="sealed as model 'fraud', not 'spam'"):
        load_sealed_models({"spam": fraud}, CANARY_KEY, intra_op_threads=1)
    # Without a recorded name an artifact loads under any (what older artifacts do).
    assert load_sealed_models({"spam": anonymous}, CANARY_KEY, intra_op_threads=1).get("spam").name == "spam"
    with pytest.raises(ConfigurationError, match="not an ONNX model"):
        load_sealed_models({"fraud": text}, CANARY_KEY, intra_op_threads=1)
