"""The simulation TEE: works end to end, is loud about it, and verifies only with its key."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import cbor2
import pytest

from enclaveml.attestation.appraisal import appraise_evidence
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.attestation.policy import default_policy
from enclaveml.attestation.simulation import (
    SimulationKey,
    SimulationProvider,
    SimulationVerifier,
    workload_measurement,
)
from enclaveml.errors import BindingError, ConfigurationError, PolicyRejectedError, VerificationError

REPORT = bytes(range(64))


def test_round_trip_claims(
    sim_provider: SimulationProvider, sim_verifier: SimulationVerifier, sim_policy
) -> None:
    evidence = sim_provider.collect(REPORT)
    assert evidence.tee is TeeType.SIMULATION
    claims = appraise_evidence(
        evidence, verifier=sim_verifier, policy=sim_policy, expected_report_data=REPORT
    )
    assert claims.simulated
    assert claims.measurement == sim_provider.measurement
    assert claims.report_data == REPORT
    assert claims.to_dict()["simulated"] is True


def test_default_policy_rejects_simulation(sim_provider: SimulationProvider, sim_verifier) -> None:
    with pytest.raises(PolicyRejectedError, match="simulated evidence"):
        appraise_evidence(sim_provider.collect(REPORT), verifier=sim_verifier, policy=default_policy())


def test_binding_mismatch(sim_provider: SimulationProvider, sim_verifier, sim_policy) -> None:
    with pytest.raises(BindingError):
        appraise_evidence(
            sim_provider.collect(REPORT),
            verifier=sim_verifier,
            policy=sim_policy,
            expected_report_data=bytes(64),
        )


def test_only_the_configured_key_verifies(sim_provider: SimulationProvider) -> None:
    evidence = sim_provider.collect(REPORT)
    with pytest.raises(VerificationError, match="signature is invalid"):
        SimulationVerifier(SimulationKey.generate().public_key()).verify(evidence)


def test_every_byte_flip_is_rejected(
    sim_provider: SimulationProvider, sim_verifier: SimulationVerifier
) -> None:
    data = sim_provider.collect(REPORT).data
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(VerificationError):
            sim_verifier.verify(Evidence(TeeType.SIMULATION, bytes(tampered)))


def test_garbage_is_rejected(sim_verifier: SimulationVerifier) -> None:
    for blob in (b"\x00", cbor2.dumps([b"a"]), cbor2.dumps({"x": 1}), b"\xff" * 5000):
        with pytest.raises(VerificationError):
            sim_verifier.verify(Evidence(TeeType.SIMULATION, blob))


def test_bytes_after_the_token_are_rejected(
    sim_provider: SimulationProvider, sim_verifier: SimulationVerifier
) -> None:
    data = sim_provider.collect(REPORT).data
    sim_verifier.verify(Evidence(TeeType.SIMULATION, data))
    with pytest.raises(VerificationError, match="not valid CBOR"):
        sim_verifier.verify(Evidence(TeeType.SIMULATION, data + b"\x00"))


def test_future_issue_time_is_rejected(
    sim_provider: SimulationProvider, sim_verifier: SimulationVerifier
) -> None:
    evidence = sim_provider.collect(REPORT)
    with pytest.raises(VerificationError, match="future"):
        sim_verifier.verify(evidence, now=1_000_000)


def test_report_data_must_be_64_bytes(sim_provider: SimulationProvider) -> None:
    with pytest.raises(ConfigurationError, match="exactly 64 bytes"):
        sim_provider.collect(b"short")


def test_measurement_covers_entry_point_and_config() -> None:
    base = workload_measurement("serve", {"model": "a"})
    assert base == workload_measurement("serve", {"model": "a"})
    assert base != workload_measurement("serve", {"model": "b"})
    assert base != workload_measurement("train", {"model": "a"})
    assert len(base) == 48


def test_provider_warns_loudly(sim_key: SimulationKey, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        SimulationProvider(key=sim_key)
    assert "protects nothing" in caplog.text


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "sim.pem"
    first = SimulationKey.load_or_create(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert SimulationKey.load_or_create(path).public_bytes == first.public_bytes
    path.write_text("not a key")
    with pytest.raises(ConfigurationError, match="not a PEM"):
        SimulationKey.load_or_create(path)


def test_key_refuses_pickle_and_repr_hides_secret(sim_key: SimulationKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(sim_key)
    assert "BEGIN" not in repr(sim_key)


def test_wrong_tee_type(sim_verifier: SimulationVerifier) -> None:
    with pytest.raises(VerificationError, match="cannot verify sgx"):
        sim_verifier.verify(Evidence(TeeType.SGX, b"\x03\x00"))
