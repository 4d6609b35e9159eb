"""Shared fixtures: a simulation TEE with a throw-away key, and the vector directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclaveml.attestation.policy import AllOf, DebugMode, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier

VECTORS = Path(__file__).parent / "vectors" / "data"


@pytest.fixture(autouse=True)
def _isolated_simulation_key(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never touch the developer's real simulation key from a test."""
    monkeypatch.setenv("ENCLAVEML_SIMULATION_KEY", str(tmp_path_factory.mktemp("simkey") / "key.pem"))


@pytest.fixture
def sim_key() -> SimulationKey:
    return SimulationKey.generate()


@pytest.fixture
def sim_provider(sim_key: SimulationKey) -> SimulationProvider:
    return SimulationProvider(key=sim_key, entry_point="tests", config={"purpose": "unit-test"})


@pytest.fixture
def sim_verifier(sim_key: SimulationKey) -> SimulationVerifier:
    return SimulationVerifier(sim_key.public_key())


@pytest.fixture
def sim_policy(sim_provider: SimulationProvider) -> UnsafeAllowSimulation:
    """The explicitly unsafe policy that admits exactly the test workload's simulated measurement."""
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([sim_provider.measurement]), DebugMode()))
