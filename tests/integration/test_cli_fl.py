"""`enclaveml fl`: plan, enrol, print the measurement, and a two-client run of the real commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from enclaveml.attestation import AllOf, MeasurementAllowlist, UnsafeAllowSimulation, dump_policy
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider
from enclaveml.cli.fl import ENTRY_POINT, app
from enclaveml.fl.aggregator import token_sha256
from enclaveml.fl.plan import TrainingPlan
from tests.fl_digits import initial_weights

CLI = "from enclaveml.cli.fl import app; app()"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def make_plan(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    weights = tmp_path / "init.npz"
    np.savez(weights, *initial_weights(0))
    plan = tmp_path / "plan.json"
    invoke(
        "plan", "--strategy", "fedprox", "--option", "proximal_mu=0.001", "--initial-weights", str(weights),
        "--rounds", "2", "--min-clients", "2", "--round-timeout", "30", "--model-id", "digits-mlp",
        "--validation", "norm_outlier_factor=20", "--output", str(plan), *extra,
    )  # fmt: skip
    return plan, weights


def test_plan_enrol_and_measurement(tmp_path: Path) -> None:
    plan_path, _ = make_plan(tmp_path)
    plan = TrainingPlan.from_dict(json.loads(plan_path.read_text()))
    assert plan.strategy == {"name": "fedprox", "proximal_mu": 0.001}
    assert plan.validation == {"norm_outlier_factor": 20}
    assert (plan.rounds, plan.min_clients, plan.model_id) == (2, 2, "digits-mlp")
    registry = tmp_path / "clients.json"
    tokens = json.loads(invoke("enrol", str(registry), "alice", "bob"))
    stored = json.loads(registry.read_text())["clients"]
    assert stored == {name: token_sha256(token).hex() for name, token in tokens.items()}
    assert not any(token in registry.read_text() for token in tokens.values())
    printed = invoke("aggregator", "--plan", str(plan_path), "--tee", "simulation", "--print-measurement")
    expected = SimulationProvider(entry_point=ENTRY_POINT, config=plan.to_dict()).measurement.hex()
    assert expected in printed
    result = CliRunner().invoke(app, ["aggregator", "--plan", str(plan_path), "--tee", "simulation"])
    assert result.exit_code == 3  # nothing to aggregate without initial weights and clients


def test_a_plan_that_names_its_participants_takes_no_other_registry(tmp_path: Path) -> None:
    registry = tmp_path / "clients.json"
    tokens = json.loads(invoke("enrol", str(registry), "alice", "bob"))
    plan_path, weights = make_plan(tmp_path, "--participants", str(registry))
    plan = TrainingPlan.from_dict(json.loads(plan_path.read_text()))
    assert plan.participants == {name: token_sha256(token).hex() for name, token in tokens.items()}
    # The host adds a client of its own to the registry: the aggregator refuses to start.
    invoke("enrol", str(registry), "host-client")
    result = CliRunner().invoke(
        app, ["aggregator", "--plan", str(plan_path), "--initial-weights", str(weights), "--clients",
              str(registry), "--tee", "simulation", "--port", "0"],
    )  # fmt: skip
    assert result.exit_code == 3
    assert "differs from the participants the plan names" in result.output
    # A plan without participants says who decides instead.
    unpinned = CliRunner().invoke(
        app, ["plan", "--strategy", "fedavg", "--initial-weights", str(weights), "--rounds", "1",
              "--min-clients", "1", "-o", str(tmp_path / "p.json")],
    )  # fmt: skip
    assert unpinned.exit_code == 0
    assert "names no participants" in unpinned.output


def test_aggregator_and_two_clients_as_processes(tmp_path: Path) -> None:
    registry = tmp_path / "clients.json"
    tokens = json.loads(invoke("enrol", str(registry), "c0", "c1"))
    # The plan names the participants, so the aggregator needs no --clients file.
    plan_path, weights = make_plan(tmp_path, "--participants", str(registry))
    plan = json.loads(plan_path.read_text())
    key_path = Path(os.environ["ENCLAVEML_SIMULATION_KEY"])
    sim_key = SimulationKey.load_or_create(key_path)
    measurement = SimulationProvider(key=sim_key, entry_point=ENTRY_POINT, config=plan).measurement
    policy = tmp_path / "policy.json"
    policy.write_text(dump_policy(UnsafeAllowSimulation(AllOf(MeasurementAllowlist([measurement])))))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    aggregator = subprocess.Popen(
        [sys.executable, "-c", CLI, "aggregator", "--plan", str(plan_path), "--initial-weights", str(weights),
         "--tee", "simulation", "--port", port],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert aggregator.stderr is not None
        for line in aggregator.stderr:  # wait for the "aggregating plan ..." line
            if "aggregating plan" in line:
                break
        clients = []
        for index, (name, token) in enumerate(tokens.items()):
            (tmp_path / name).write_text(token)
            command = [
                sys.executable, "-c", CLI, "client", f"https://127.0.0.1:{port}", "--plan", str(plan_path),
                "--trainer", "tests.fl_digits:cli_trainer", "--policy", str(policy),
                "--credential-file", str(tmp_path / name), "--simulation-key", str(key_path),
                "--output", str(tmp_path / f"{name}.npz"),
            ]  # fmt: skip
            env = {**os.environ, "ENCLAVEML_TEST_FL_CLIENT": str(index)}
            clients.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outputs = [c.communicate(timeout=120)[0] for c in clients]
        assert [c.returncode for c in clients] == [0, 0], outputs
        assert all("training finished after 2 rounds" in out for out in outputs)
        with np.load(tmp_path / "c0.npz") as a, np.load(tmp_path / "c1.npz") as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    finally:
        aggregator.kill()
        aggregator.wait()
