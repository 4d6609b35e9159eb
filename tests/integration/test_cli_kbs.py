"""The key broker CLI end to end: token → `kbs serve` (a real process) → keys, policies → seal → unseal.

Admin and workload commands run in-process (CliRunner) against the broker subprocess over
HTTPS; the broker's self-signed certificate is pinned through ENCLAVEML_KBS_CA.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from enclaveml.attestation.simulation import SimulationKey, default_key_path, workload_measurement
from enclaveml.cli import app
from enclaveml.crypto import read_header
from enclaveml.kms._http import ssl_context
from tests.integration.test_kms_release import CANARY

SCOPES = ["keys:read", "keys:write", "keys:delete", "keys:wrap", "policy:write", "audit:read"]


@dataclass
class Served:
    env: dict[str, str]
    db: Path
    process: subprocess.Popen[str]


def _cli(env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    output = result.stdout.strip()
    try:
        payload = json.loads(output) if output.startswith("{") else {}
    except json.JSONDecodeError:
        payload = {}
    return result.exit_code, payload, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = _start_broker(tmp_path)
    try:
        yield running
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)


def _start_broker(tmp_path: Path, **environ: str) -> Served:
    """`kbs serve` in a child process (environment plus ``environ``), once it answers /healthz."""
    SimulationKey.load_or_create()  # the workload's simulation key ($ENCLAVEML_SIMULATION_KEY)
    db, root_key, cert = (
        tmp_path / "db" / "kbs.db",
        tmp_path / "secrets" / "root.key",
        tmp_path / "kbs-cert.pem",
    )
    db.parent.mkdir()
    code, _, text = _cli({}, "kbs", "root-key", "create", str(root_key), "--db", str(db))
    assert code == 0, text
    scopes = [arg for scope in SCOPES for arg in ("--scope", scope)]
    code, created, text = _cli(
        {}, "kbs", "token", "create", "--db", str(db), "--name", "ci", *scopes, "--json"
    )
    assert code == 0, text
    port = _free_port()
    command = [
        sys.executable,
        "-c",
        "from enclaveml.cli import main; main()",
        "kbs",
        "serve",
        "--db",
        str(db),
    ]
    command += ["--root-key", str(root_key), "--port", str(port), "--cert-out", str(cert)]
    command += ["--simulation-key", str(default_key_path()), "--log-level", "warning"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **environ}
    )
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "kbs serve did not come up"
        try:
            if cert.exists() and httpx.get(f"{url}/healthz", verify=ssl_context(cert)).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    env = {"ENCLAVEML_KBS_URL": url, "ENCLAVEML_KBS_TOKEN": created["token"], "ENCLAVEML_KBS_CA": str(cert)}
    return Served(env, db, process)


def test_the_self_signed_tls_key_never_reaches_the_disk(tmp_path: Path) -> None:
    # Stopped by SIGTERM (systemctl, docker stop) uvicorn re-raises the signal after its
    # shutdown, so a key in a temporary directory was left behind; it must never be written.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    running = _start_broker(tmp_path, TMPDIR=str(scratch))
    try:
        written = [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
        assert written == []
    finally:
        running.process.terminate()
        running.process.wait(timeout=30)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()] == []
    assert list(scratch.iterdir()) == []


def _policy_toml(path: Path, measurement: bytes) -> Path:
    path.write_text(
        'type = "unsafe_allow_simulation"\n[policy]\ntype = "all_of"\n'
        f'[[policy.rules]]\ntype = "measurement"\nvalues = ["{measurement.hex()}"]\n'
    )
    return path


def test_token_serve_key_policy_seal_unseal_round_trip(tmp_path: Path, served: Served) -> None:
    env = served.env
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx:" + CANARY + os.urandom(100_000))
    allowed = _policy_toml(tmp_path / "policy.toml", workload_measurement("enclaveml"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps(
            {"type": "unsafe_allow_simulation", "policy": {"type": "measurement", "values": ["00" * 48]}}
        )
    )

    code, out, text = _cli(env, "kbs", "key", "create", "model", "--policy", str(wrong), "--json")
    assert (code, out) == (0, {"key_id": "model", "version": 1}), text
    code, out, text = _cli(env, "kbs", "policy", "set", "model", str(allowed), "--json")
    assert code == 0, text
    code, out, text = _cli(
        env, "seal", str(model), str(tmp_path / "model.sealed"), "--key", "model", "--json"
    )
    assert (code, out["version"]) == (0, 1), text
    plain = tmp_path / "plain" / "model.onnx"
    plain.parent.mkdir()
    code, out, text = _cli(
        env, "unseal", str(tmp_path / "model.sealed"), "--output", str(plain), "--tee", "simulation"
    )
    assert code == 0, text
    assert "SIMULATION" in text
    assert plain.read_bytes() == model.read_bytes()
    assert sorted(p.name for p in plain.parent.iterdir()) == ["model.onnx"]  # no partial files left

    # Rotate, seal again: both versions unseal; the key list shows both.
    assert _cli(env, "kbs", "key", "rotate", "model", "--json")[1] == {"key_id": "model", "version": 2}
    code, out, text = _cli(
        env, "seal", str(model), str(tmp_path / "model.v2.sealed"), "--key", "model",
        "--model-name", "fraud", "--batchable", "--json",
    )  # fmt: skip
    assert out["version"] == 2, text
    metadata = read_header(tmp_path / "model.v2.sealed").metadata
    assert metadata == {"model_name": "fraud", "batchable": "true"}  # for `serve`
    code, _, text = _cli(
        env,
        "unseal",
        str(tmp_path / "model.v2.sealed"),
        "-o",
        str(tmp_path / "v2.onnx"),
        "--tee",
        "simulation",
    )
    assert code == 0, text
    assert (tmp_path / "v2.onnx").read_bytes() == model.read_bytes()
    code, listing, _ = _cli(env, "kbs", "key", "list", "--json")
    assert [(k["key_id"], k["versions"], k["state"]) for k in listing["keys"]] == [
        ("model", [1, 2], "enabled")
    ]

    # Another policy: the same workload is now refused, exit 1 naming the rule, and no output appears.
    code, _, text = _cli(env, "kbs", "policy", "set", "model", str(wrong))
    assert code == 0, text
    denied_out = tmp_path / "denied.onnx"
    code, out, text = _cli(
        env, "unseal", str(tmp_path / "model.sealed"), "-o", str(denied_out), "--tee", "simulation", "--json"
    )
    assert code == 1, text
    assert out["error"]["rule"] == "measurement"
    assert not denied_out.exists()
    assert not list(tmp_path.glob(".denied.onnx*"))

    # Refusals and usage errors.
    code, _, text = _cli(
        env, "unseal", str(tmp_path / "model.sealed"), "-o", str(plain), "--tee", "simulation"
    )
    assert code == 3
    assert "exists" in text
    assert _cli(env, "kbs", "key", "delete", "model")[0] == 3  # needs --yes
    assert _cli({**env, "ENCLAVEML_KBS_TOKEN": "wrong"}, "kbs", "key", "list")[0] == 1
    code, _, text = _cli(env, "kbs", "key", "disable", "model")
    assert code == 0, text
    assert _cli(env, "seal", str(model), str(tmp_path / "x.sealed"), "--key", "model")[0] == 1

    served.process.terminate()
    logs = served.process.communicate(timeout=30)[0]
    assert "SIMULATION" in logs
    assert "fingerprint" in logs
    assert CANARY.decode() not in logs + text
    plaintexts = {model, plain, tmp_path / "v2.onnx"}  # the input and the two explicit outputs
    for path in tmp_path.rglob("*"):
        if path.is_file() and path not in plaintexts:
            assert CANARY not in path.read_bytes(), f"plaintext found in {path}"


def test_unseal_reads_a_pipe_and_reports_a_failed_write_as_an_error(tmp_path: Path, served: Served) -> None:
    env = served.env
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx:" + CANARY + os.urandom(200_000))
    policy = _policy_toml(tmp_path / "policy.toml", workload_measurement("enclaveml"))
    assert _cli(env, "kbs", "key", "create", "model", "--policy", str(policy))[0] == 0
    sealed = tmp_path / "model.sealed"
    assert _cli(env, "seal", str(model), str(sealed), "--key", "model")[0] == 0
    # From a pipe (read once: the header printed is the authenticated one). In a child with a
    # timeout: reading the pipe twice used to wait for a second writer forever.
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_bytes(sealed.read_bytes()), daemon=True)
    feeder.start()
    out = tmp_path / "from-pipe.onnx"
    cli = "from enclaveml.cli import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", cli, "unseal", str(fifo), "-o", str(out), "--tee", "simulation", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    feeder.join(10)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["key_id"], result["version"]) == ("model", 1)
    assert out.read_bytes() == model.read_bytes()
    # A write the file system refuses (here: the file-size limit) is an error message and exit 3,
    # not a traceback, and leaves no output.
    limited = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); from enclaveml.cli import main; main()"
    )
    big = tmp_path / "too-big.onnx"
    run = subprocess.run(
        [sys.executable, "-c", limited, "unseal", str(sealed), "-o", str(big), "--tee", "simulation"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert "file input/output failed" in " ".join(run.stderr.split())
    assert "Traceback" not in run.stderr
    assert not big.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".too-big")]


def test_audit_verify_detects_an_edited_row(tmp_path: Path, served: Served) -> None:
    env = served.env
    policy = _policy_toml(tmp_path / "policy.toml", workload_measurement("enclaveml"))
    for key in ("a", "b"):
        assert _cli(env, "kbs", "key", "create", key, "--policy", str(policy))[0] == 0
    code, out, text = _cli(env, "kbs", "audit", "verify", "--db", str(served.db), "--json")
    assert (code, out["ok"]) == (0, True), text
    code, out, text = _cli(env, "kbs", "audit", "verify", "--json")  # via the API, env URL and token
    assert (code, out["broker"]["ok"]) == (0, True), text
    assert out["broker"]["records"] >= 3  # token creation and two keys

    with sqlite3.connect(served.db) as db:
        [(seq,)] = db.execute("SELECT seq FROM audit WHERE event = 'key.create' AND key_id = 'a'").fetchall()
        db.execute("UPDATE audit SET key_id = 'z' WHERE seq = ?", (seq,))
    code, out, text = _cli({}, "kbs", "audit", "verify", "--db", str(served.db), "--json")
    assert code == 1, text
    assert out["db"] == {"ok": False, "records": out["db"]["records"], "first_bad": seq}
    code, out, text = _cli(env, "kbs", "audit", "verify")
    assert code == 1
    assert f"BROKEN at seq {seq}" in text


def test_a_token_revoked_with_the_cli_is_refused_by_the_running_broker(served: Served) -> None:
    db = str(served.db)
    code, created, text = _cli(
        {}, "kbs", "token", "create", "--db", db, "--name", "ops", "--scope", "keys:read", "--json"
    )
    assert code == 0, text
    ops = {**served.env, "ENCLAVEML_KBS_TOKEN": created["token"]}
    assert _cli(ops, "kbs", "key", "list", "--json")[0] == 0
    code, listed, text = _cli({}, "kbs", "token", "list", "--db", db, "--json")
    assert code == 0, text
    assert {"name": "ops", "scopes": ["keys:read"], "revoked": False} in listed["tokens"]
    assert created["token"] not in text  # names and scopes, never secrets

    code, _, text = _cli({}, "kbs", "token", "revoke", "ops", "--db", db)
    assert code == 0, text
    code, _, text = _cli(ops, "kbs", "key", "list", "--json")
    assert code != 0
    assert "invalid admin token" in text
    assert _cli(served.env, "kbs", "key", "list", "--json")[0] == 0  # the other token still works
    code, listed, _ = _cli({}, "kbs", "token", "list", "--db", db, "--json")
    assert {"name": "ops", "scopes": ["keys:read"], "revoked": True} in listed["tokens"]
    with sqlite3.connect(served.db) as conn:
        events = [row[0] for row in conn.execute("SELECT detail FROM audit WHERE event = 'token.revoke'")]
    assert events == ["by cli: ops"]

    assert _cli({}, "kbs", "token", "revoke", "nobody", "--db", db)[0] != 0
    assert _cli({}, "kbs", "token", "list", "--db", db + ".typo")[0] == 3  # no empty database made
    assert not Path(db + ".typo").exists()
