"""Vertical FL with the server and three parties as separate processes over real sockets on 127.0.0.1.

What is asserted is what crossed: each process records the bytes it *received*; the server never
received a raw feature value (not one column of any party, nor any of its values as a float),
and the passive parties never received the labels (in the default boosting placement, nothing
derived from them at all).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from enclaveml.attestation.simulation import SimulationKey
from enclaveml.fl.vertical._codec import decode
from enclaveml.fl.vertical.plan import VerticalPlan
from tests.vfl_process import dataset, new_tokens

PARTIES = ["bank", "insurer", "telco"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(tmp_path: Path, plan: VerticalPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    tokens = new_tokens(PARTIES)
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    key = tmp_path / "sim.pem"
    SimulationKey.load_or_create(key)
    port = _free_port()
    base = [sys.executable, "-m", "tests.vfl_process"]
    common = ["--plan", str(tmp_path / "plan.json"), "--sim-key", str(key)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(
        [*base, "server", *common, "--tokens", str(tmp_path / "tokens.json"), "--port", str(port),
         "--out", str(tmp_path / "server.cbor")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    parties = []
    for name in PARTIES:
        command = [*base, "party", *common, "--name", name, f"--token={tokens[name]}", "--url",
                   f"https://127.0.0.1:{port}", "--out", str(tmp_path / f"{name}.cbor")]  # fmt: skip
        parties.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        outputs = [p.communicate(timeout=600)[0] for p in parties]
        server_output = server.communicate(timeout=60)[0]
    finally:
        for process in (server, *parties):
            process.kill()
            process.wait()
    assert [p.returncode for p in parties] == [0, 0, 0], outputs
    assert server.returncode == 0, server_output
    received = {name: cbor2.loads((tmp_path / f"{name}.cbor").read_bytes()) for name in PARTIES}
    return cbor2.loads((tmp_path / "server.cbor").read_bytes()), received


def arrays(message: Any) -> list[np.ndarray]:
    """Every numpy array anywhere in a decoded message."""
    if isinstance(message, np.ndarray):
        return [message]
    if isinstance(message, dict):
        return [a for v in message.values() for a in arrays(v)]
    if isinstance(message, list):
        return [a for v in message for a in arrays(v)]
    return []


def assert_server_saw_no_feature(server: dict[str, Any]) -> None:
    x, _, _ = dataset()
    values = set(np.round(x.ravel(), 12).tolist())
    for _, method, response in server["received"]:
        for array in arrays(decode(response)):
            if array.dtype.kind == "f":
                # Not a feature column, and not one feature value among its numbers.
                assert not any(array.shape == column.shape and np.allclose(array, column) for column in x.T)
                sample = np.round(array.ravel()[:5000], 12)
                assert not values.intersection(sample.tolist()), method
        assert x.tobytes()[:64] not in response


def test_logistic_regression_three_party_processes(tmp_path: Path) -> None:
    plan = VerticalPlan(task="train", parties=tuple(PARTIES), algorithm="logreg", params={"max_iter": 200})
    server, parties = run(tmp_path, plan)
    assert server["state"] == "succeeded"
    assert_server_saw_no_feature(server)
    _, y, _ = dataset()
    for name in PARTIES[1:]:
        for method, request in parties[name]["received"]:
            message = decode(request)
            assert "labels" not in message
            assert not any(a.shape == y.shape and np.array_equal(a, y) for a in arrays(message)), method


def test_boosting_three_party_processes(tmp_path: Path) -> None:
    params = {"n_estimators": 20, "max_depth": 4}
    plan = VerticalPlan(task="train", parties=tuple(PARTIES), algorithm="boosting", params=params)
    server, parties = run(tmp_path, plan)
    assert server["state"] == "succeeded"
    assert_server_saw_no_feature(server)
    methods = {m for _, m, _ in server["received"]}
    assert methods == {"boost.setup", "boost.labels", "boost.finish"}  # codes and labels, once
    _, y, _ = dataset()
    for name in PARTIES[1:]:
        # Default placement: a passive party receives the set-up and, at the end, which of its own
        # features and bins the model uses; nothing per row, nothing derived from the labels.
        received = [method for method, _ in parties[name]["received"]]
        assert received == ["boost.setup", "boost.finish"], received
        for _, request in parties[name]["received"]:
            message = decode(request)
            assert not any(a.shape == y.shape for a in arrays(message))
    assert parties["bank"]["part"]  # each party ends with its own (sealable) part of the model
