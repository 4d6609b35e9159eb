"""`enclaveml serve` and `enclaveml predict` as real processes; tritonclient with the pinned certificate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from enclaveml.attestation import MeasurementAllowlist, UnsafeAllowSimulation, attest_server
from enclaveml.attestation.simulation import default_key_path
from enclaveml.cli._verifiers import build_verifier
from tests.integration.test_cli_kbs import Served, _cli, _free_port, _policy_toml, served  # noqa: F401
from tests.redis_server import redis_snapshot
from tests.serving_models import digits_model


def _start_server(env: dict[str, str], sealed: Path, port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", "from enclaveml.cli import main; main()", "serve"]
    command += ["--model", f"digits={sealed}", "--tee", "simulation", "--port", str(port)]
    command += ["--threads", "1", "--instances", "2"]
    return subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_ready(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "enclaveml serve did not come up"
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)


def test_serve_predict_and_tritonclient(tmp_path: Path, served: Served) -> None:  # noqa: F811
    env = served.env
    model_bytes, x_test, _ = digits_model()
    plain = tmp_path / "digits.onnx"
    plain.write_bytes(model_bytes)
    sealed = tmp_path / "digits.sealed"
    code, _, text = _cli(env, "seal", str(plain), str(sealed), "--key", "digits", "--json")
    assert code != 0  # the key does not exist yet: nothing sealed
    assert not sealed.exists()

    code, _, text = _cli(
        env, "serve", "--model", f"digits={sealed}", "--tee", "simulation", "--print-measurement"
    )
    assert code == 0, text
    measurement = bytes.fromhex(re.search(r"\b[0-9a-f]{96}\b", text).group(0))  # type: ignore[union-attr]
    policy = _policy_toml(tmp_path / "policy.toml", measurement)
    assert _cli(env, "kbs", "key", "create", "digits", "--policy", str(policy), "--json")[0] == 0
    code, _, text = _cli(
        env, "seal", str(plain), str(sealed), "--key", "digits", "--content-type", "application/onnx"
    )
    assert code == 0, text
    plain.unlink()

    port = _free_port()
    process = _start_server(env, sealed, port)
    try:
        _wait_ready(process, port)
        url = f"https://127.0.0.1:{port}"
        np.save(tmp_path / "x.npy", x_test[:20])
        code, out, text = _cli(
            {},
            "predict", url, "digits", "--input", str(tmp_path / "x.npy"), "--policy", str(policy),
            "--simulation-key", str(default_key_path()), "--json",
        )  # fmt: skip
        assert code == 0, text
        expected = ort.InferenceSession(model_bytes).run(None, {"X": x_test[:20]})[0]
        assert out["outputs"]["label"] == expected.tolist()
        assert out["claims"]["measurement"] == measurement.hex()

        # A client whose policy expects other code is refused (exit 1) and sends nothing.
        wrong = tmp_path / "wrong.json"
        wrong.write_text(
            json.dumps(
                {"type": "unsafe_allow_simulation", "policy": {"type": "measurement", "values": ["00" * 48]}}
            )
        )
        code, _, text = _cli(
            {},
            "predict", url, "digits", "--input", str(tmp_path / "x.npy"), "--policy", str(wrong),
            "--simulation-key", str(default_key_path()),
        )  # fmt: skip
        assert code == 1, text

        # tritonclient: verify first (RA-TLS), then hand it exactly the attested certificate.
        verifier = build_verifier(simulation_key=default_key_path(), banner=False)
        attested = attest_server(
            url, verifier=verifier, policy=UnsafeAllowSimulation(MeasurementAllowlist([measurement]))
        )
        pinned = tmp_path / "server.pem"
        pinned.write_bytes(__import__("ssl").DER_cert_to_PEM_cert(attested.peer.certificate_der).encode())
        client = triton.InferenceServerClient(
            url=f"localhost:{port}", ssl=True, ssl_options={"ca_certs": str(pinned)}
        )
        request = triton.InferInput("X", list(x_test[:5].shape), "FP32")
        request.set_data_from_numpy(x_test[:5], binary_data=True)
        result = client.infer("digits", [request])
        np.testing.assert_array_equal(result.as_numpy("label"), expected[:5])
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    # The server process never wrote the plaintext model anywhere under the test's directory.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert model_bytes[:4096] not in path.read_bytes(), path


def test_serve_refuses_an_artifact_sealed_under_a_retired_key_version(
    tmp_path: Path,
    served: Served,  # noqa: F811
) -> None:
    """Rollback: the host puts back the v1 artifact after the owner sealed v2 and retired version 1."""
    env = served.env
    model_bytes, _, _ = digits_model()
    plain = tmp_path / "digits.onnx"
    plain.write_bytes(model_bytes)
    code, _, text = _cli(
        env,
        "serve",
        "--model",
        f"digits={tmp_path / 'v1.sealed'}",
        "--tee",
        "simulation",
        "--print-measurement",
    )
    assert code == 0, text
    measurement = bytes.fromhex(re.search(r"\b[0-9a-f]{96}\b", text).group(0))  # type: ignore[union-attr]
    policy = _policy_toml(tmp_path / "policy.toml", measurement)
    assert _cli(env, "kbs", "key", "create", "digits", "--policy", str(policy), "--json")[0] == 0
    seal = ("--key", "digits", "--content-type", "application/onnx", "--model-name", "digits")
    assert _cli(env, "seal", str(plain), str(tmp_path / "v1.sealed"), *seal)[0] == 0
    assert _cli(env, "kbs", "key", "rotate", "digits", "--json")[1] == {"key_id": "digits", "version": 2}
    assert _cli(env, "seal", str(plain), str(tmp_path / "v2.sealed"), *seal)[0] == 0
    code, out, text = _cli(env, "kbs", "key", "min-version", "digits", "2", "--json")
    assert (code, out) == (0, {"key_id": "digits", "min_version": 2}), text
    code, out, text = _cli(env, "kbs", "key", "list", "--json")
    assert [(k["versions"], k["min_version"]) for k in out["keys"]] == [([1, 2], 2)]
    assert _cli(env, "kbs", "key", "min-version", "digits", "3")[0] != 0  # no such version

    process = _start_server(env, tmp_path / "v1.sealed", _free_port())
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output  # refused, as for any denied release
    assert "rule 'version_retired'" in output, output
    assert model_bytes[:64].hex() not in output

    port = _free_port()
    process = _start_server(env, tmp_path / "v2.sealed", port)  # the current release starts
    try:
        _wait_ready(process, port)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("spec", ["digits", "=x.sealed", "digits="])
def test_bad_model_spec_is_a_usage_error(spec: str) -> None:
    code, _, text = _cli({}, "serve", "--model", spec, "--tee", "simulation", "--print-measurement")
    assert code == 3, text


def _measurement(env: dict[str, str], *command: str) -> str:
    code, _, text = _cli(env, *command, "--tee", "simulation", "--print-measurement")
    assert code == 0, text
    return re.search(r"\b[0-9a-f]{96}\b", text).group(0)  # type: ignore[union-attr]


def _wait_for_line(process: subprocess.Popen[str], needle: str, timeout_s: float = 90) -> None:
    """Read the process's output until a line contains ``needle`` (a worker has no port to probe)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never appeared: {''.join(seen)}")


def test_serve_queue_and_serve_worker_obtain_their_keys_from_the_broker(
    tmp_path: Path,
    served: Served,  # noqa: F811
    redis_url: str,
) -> None:
    """The scale-out CLI end to end: a front end and a worker, each attested to the broker for the
    model key and the cluster key, answer through encrypted Redis Streams."""
    env = served.env
    model_bytes, x_test, _ = digits_model()
    plain = tmp_path / "digits.onnx"
    plain.write_bytes(model_bytes)
    sealed = tmp_path / "digits.sealed"
    spec = ["--model", f"digits={sealed}"]
    front_end = _measurement(env, "serve", *spec, "--queue", redis_url)
    worker = _measurement(env, "serve-worker", *spec, "--queue", redis_url)
    assert front_end != worker  # different code paths, separately allowed
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'type = "unsafe_allow_simulation"\n[policy]\ntype = "measurement"\n'
        f'values = ["{front_end}", "{worker}"]\n'
    )
    for key in ("digits", "enclaveml-cluster"):
        assert _cli(env, "kbs", "key", "create", key, "--policy", str(policy), "--json")[0] == 0
    code, _, text = _cli(
        env, "seal", str(plain), str(sealed), "--key", "digits", "--content-type", "application/onnx"
    )
    assert code == 0, text

    base = [sys.executable, "-c", "from enclaveml.cli import main; main()"]
    options = {
        "env": {**os.environ, **env},
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
    }
    worker_process = subprocess.Popen(
        [*base, "serve-worker", *spec, "--queue", redis_url, "--tee", "simulation", "--instances", "2"],
        **options,  # type: ignore[call-overload]
    )
    port = _free_port()
    server = subprocess.Popen(
        [*base, "serve", *spec, "--queue", redis_url, "--tee", "simulation", "--port", str(port)],
        **options,  # type: ignore[call-overload]
    )
    try:
        _wait_for_line(worker_process, "worker serving digits")
        _wait_ready(server, port)
        np.save(tmp_path / "x.npy", x_test[:20])
        code, out, text = _cli(
            {},
            "predict", f"https://127.0.0.1:{port}", "digits", "--input", str(tmp_path / "x.npy"),
            "--policy", str(policy), "--simulation-key", str(default_key_path()), "--json",
        )  # fmt: skip
        assert code == 0, text
        expected = ort.InferenceSession(model_bytes).run(None, {"X": x_test[:20]})[0]
        assert out["outputs"]["label"] == expected.tolist()
        assert out["claims"]["measurement"] == front_end
    finally:
        for process in (server, worker_process):
            process.terminate()
        for process in (server, worker_process):
            process.wait(timeout=30)
    assert worker_process.returncode == 0  # SIGTERM drains and stops the worker cleanly
    blob, _ = redis_snapshot(redis_url)
    # Redis saw ciphertext only: neither an input row nor even the model name.
    assert x_test[0].tobytes() not in blob
    assert b"digits" not in blob
