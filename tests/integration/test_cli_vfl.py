"""`enclaveml vfl` as real processes: a broker, the server in a (simulated) TEE and three parties.

The parties' files are CSV with IDs in a partial overlap; PSI aligns them, training and prediction
run on the aligned rows, every party's model part is sealed under its own broker key.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from enclaveml.attestation.simulation import SimulationProvider, default_key_path
from enclaveml.cli.vfl import PARTY_ENTRY_POINT
from enclaveml.crypto import read_header
from tests.integration.test_cli_kbs import Served, _cli, _free_port, _policy_toml, served  # noqa: F401

PARTIES = ("bank", "insurer", "telco")
CLI = "from enclaveml.cli import main; main()"
ROWS = 900


def party_measurement(name: str) -> bytes:
    return SimulationProvider(entry_point=PARTY_ENTRY_POINT.format(name=name), config={}).measurement


def write_tables(tmp_path: Path) -> dict[str, object]:
    """Three CSVs sharing 600 of their IDs, rows shuffled differently; returns the ground truth."""
    rng = np.random.default_rng(4)
    x, y = make_classification(n_samples=ROWS, n_features=9, n_informative=6, random_state=2)
    ids = np.array([f"cust-{i:05d}" for i in rng.permutation(100_000)[:ROWS]])
    common = np.arange(600)
    columns = np.array_split(np.arange(9), 3)
    for index, name in enumerate(PARTIES):
        own = np.concatenate([common, 600 + 100 * index + np.arange(100)])  # 100 rows of its own
        order = rng.permutation(own)
        table = {"id": ids[order].tolist()}
        for c in columns[index]:
            table[f"f{c}"] = x[order, c]
        if index == 0:
            table["y"] = y[order]
        pa_csv.write_csv(pa.table(table), tmp_path / f"{name}.csv")
    return {"x": x, "y": y, "ids": ids, "common": common}


def server_measurement(env: dict[str, str], plan: Path) -> bytes:
    """What the parties' policy must allow: the simulated server running exactly this plan."""
    code, _, text = _cli(
        env, "vfl", "server", "--plan", str(plan), "--tee", "simulation", "--print-measurement"
    )
    assert code == 0, text
    return bytes.fromhex(re.search(r"\b[0-9a-f]{96}\b", text).group(0))  # type: ignore[union-attr]


def enrol(env: dict[str, str], tmp_path: Path) -> Path:
    """Credentials for every party (in NAME.token files) and the server's registry of their hashes."""
    registry = tmp_path / "parties.json"
    code, tokens, text = _cli(env, "vfl", "enrol", str(registry), *PARTIES)
    assert code == 0, text
    assert set(tokens) == set(PARTIES)
    for name, token in tokens.items():
        (tmp_path / f"{name}.token").write_text(token)
    return registry


def party_keys(env: dict[str, str], tmp_path: Path, *keys: str) -> None:
    """Broker keys that admit the parties' client code only (simulated measurements)."""
    allowed = tmp_path / "parties-policy.json"
    allowed.write_text(json.dumps({"type": "unsafe_allow_simulation", "policy": {
        "type": "measurement", "values": [party_measurement(p).hex() for p in PARTIES]}}))  # fmt: skip
    for key in keys:
        assert _cli(env, "kbs", "key", "create", key, "--policy", str(allowed), "--json")[0] == 0


def run_job(env: dict[str, str], tmp_path: Path, plan: Path, registry: Path | None,
            party_args: dict[str, list[str]], command_name: str,
            server_args: Sequence[str] = ()) -> dict[str, str]:  # fmt: skip
    """Start the server of ``plan``, then every party's ``command``; return each party's output.

    ``registry`` None: the plan pins the party credentials, the server is given no registry.
    """
    policy = _policy_toml(tmp_path / f"server-{plan.stem}.toml", server_measurement(env, plan))
    port = _free_port()
    parties_option = ["--parties", str(registry)] if registry is not None else []
    server = subprocess.Popen(
        [sys.executable, "-c", CLI, "vfl", "server", "--plan", str(plan), *parties_option,
         "--tee", "simulation", "--port", str(port), "--connect-timeout", "60", *server_args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    parties = {}
    for name, args in party_args.items():
        command = [
            sys.executable, "-c", CLI, "vfl", command_name, f"https://127.0.0.1:{port}", "--plan", str(plan),
            "--name", name, "--credential-file", str(tmp_path / f"{name}.token"), "--policy", str(policy),
            "--simulation-key", str(default_key_path()), "--tee", "simulation", *args,
        ]  # fmt: skip
        parties[name] = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    try:
        outputs = {name: p.communicate(timeout=240)[0] for name, p in parties.items()}
        server_output = server.communicate(timeout=60)[0]
    finally:
        for process in (server, *parties.values()):
            process.kill()
            process.wait()
    assert all(p.returncode == 0 for p in parties.values()), outputs
    assert server.returncode == 0, server_output
    return {**outputs, "server": server_output}


@pytest.mark.parametrize("psi_mode", ["tee", "ecdh"])
def test_psi_train_predict_with_logistic_regression(tmp_path: Path, served: Served, psi_mode: str) -> None:  # noqa: F811
    env = served.env
    truth = write_tables(tmp_path)
    registry = enrol(env, tmp_path)
    party_keys(env, tmp_path, "vfl-psi", *(f"vfl-{p}" for p in PARTIES))

    # 1. PSI: every party gets the positions of the common rows, in one common order. The plan
    #    pins each party's credential, so the server takes no registry from the host...
    plan = tmp_path / "psi.json"
    code, _, text = _cli(env, "vfl", "plan", "--task", "psi", *[a for p in PARTIES for a in ("--party", p)],
                         "--psi-mode", psi_mode, "--credentials", str(registry), "-o", str(plan))  # fmt: skip
    assert code == 0, text
    assert set(json.loads(plan.read_text())["credentials"]) == set(PARTIES)
    #    ...and refuses one where the host has put its own credential in a party's place.
    forged = tmp_path / "forged.json"
    stored = json.loads(registry.read_text())
    forged.write_text(json.dumps({"parties": {**stored["parties"], PARTIES[1]: "ab" * 32}}))
    code, _, text = _cli(env, "vfl", "server", "--plan", str(plan), "--parties", str(forged),
                         "--tee", "simulation", "--port", "0")  # fmt: skip
    assert code == 3, text
    assert "differs from the party credentials the plan names" in " ".join(text.split())
    outputs = run_job(env, tmp_path, plan, None, {
        p: ["--data", str(tmp_path / f"{p}.csv"), "--id-column", "id", "-o", str(tmp_path / f"{p}.rows.npy")]
        for p in PARTIES}, "psi")  # fmt: skip
    assert "intersection: 600 rows" in outputs["server"]
    aligned = {}
    for name in PARTIES:
        table = pa_csv.read_csv(tmp_path / f"{name}.csv")
        rows = np.load(tmp_path / f"{name}.rows.npy")
        assert stat.S_IMODE((tmp_path / f"{name}.rows.npy").stat().st_mode) == 0o600  # its own result
        aligned[name] = np.array(table.column("id").to_pylist())[rows]
    assert len(aligned["bank"]) == 600
    assert all(np.array_equal(aligned["bank"], aligned[p]) for p in PARTIES)
    assert set(aligned["bank"]) == set(truth["ids"][truth["common"]])  # type: ignore[index]

    # 2. Train logistic regression on the aligned rows; each party seals its own part.
    plan = tmp_path / "train.json"
    code, _, text = _cli(env, "vfl", "plan", "--task", "train", *[a for p in PARTIES for a in ("--party", p)],
                         "--algorithm", "logreg", "--param", "max_iter=300", "-o", str(plan))  # fmt: skip
    assert code == 0, text
    common = {p: ["--data", str(tmp_path / f"{p}.csv"), "--rows", str(tmp_path / f"{p}.rows.npy"),
                  "--id-column", "id"] for p in PARTIES}  # fmt: skip
    train_args = {p: [*a, "--model-out", str(tmp_path / f"{p}.sealed")] for p, a in common.items()}
    train_args["bank"] += ["--label-column", "y"]
    run_job(env, tmp_path, plan, registry, train_args, "train")
    for name in PARTIES:
        header = read_header(tmp_path / f"{name}.sealed")
        assert (header.key_id, dict(header.metadata)["party"]) == (f"vfl-{name}", name)

    # 3. Predict the same rows jointly: only the label party receives the predictions.
    plan = tmp_path / "predict.json"
    names = [a for p in PARTIES for a in ("--party", p)]
    code, _, text = _cli(
        env, "vfl", "plan", "--task", "predict", *names, "--algorithm", "logreg", "-o", str(plan)
    )
    assert code == 0, text
    predict_args = {p: [*a, "--model", str(tmp_path / f"{p}.sealed")] for p, a in common.items()}
    predict_args["bank"] += ["--output", str(tmp_path / "predictions.npy"), "--ignore-column", "y"]
    run_job(env, tmp_path, plan, registry, predict_args, "predict")
    predictions = np.load(tmp_path / "predictions.npy")
    assert stat.S_IMODE((tmp_path / "predictions.npy").stat().st_mode) == 0o600
    index = {value: i for i, value in enumerate(truth["ids"])}  # type: ignore[arg-type]
    order = np.array([index[v] for v in aligned["bank"]])
    x, y = truth["x"][order], truth["y"][order]  # type: ignore[index]
    central = LogisticRegression(max_iter=5000).fit(StandardScaler().fit_transform(x), y)
    accuracy = float(((predictions > 0.5) == y).mean())
    assert accuracy >= central.score(StandardScaler().fit_transform(x), y) - 0.01

    # Another party's sealed part (swapped by a host, say) is refused once unsealed, before any job.
    other = next(p for p in PARTIES if p != "bank")
    code, _, text = _cli(
        env, "vfl", "predict", "https://127.0.0.1:9", "--plan", str(plan), "--name", "bank",
        "--credential-file", str(tmp_path / "bank.token"), "--policy", str(tmp_path / "server-predict.toml"),
        "--simulation-key", str(default_key_path()), "--tee", "simulation", *common["bank"],
        "--model", str(tmp_path / f"{other}.sealed"), "--output", str(tmp_path / "swapped.npy"),
        "--ignore-column", "y",
    )  # fmt: skip
    assert code != 0
    assert f"of party '{other}', not the model part of party 'bank'" in " ".join(text.split()), text
    assert not (tmp_path / "swapped.npy").exists()


def test_boosting_with_early_stopping_sealed_server_model_and_pinned_prediction(
    tmp_path: Path,
    served: Served,  # noqa: F811
) -> None:
    env = served.env
    registry = enrol(env, tmp_path)
    party_keys(env, tmp_path, *(f"vfl-{p}" for p in PARTIES))
    x, y = make_classification(n_samples=2400, n_features=9, n_informative=6, random_state=8)
    parts = {"train": slice(0, 1600), "valid": slice(1600, 2000), "test": slice(2000, 2400)}
    for index, name in enumerate(PARTIES):  # already aligned: the same rows in the same order
        for part, rows in parts.items():
            table = {f"f{c}": x[rows, c] for c in range(3 * index, 3 * index + 3)}
            if index == 0 and part != "test":
                table["y"] = y[rows]
            pa_csv.write_csv(pa.table(table), tmp_path / f"{name}.{part}.csv")
    names = [a for p in PARTIES for a in ("--party", p)]
    plan = tmp_path / "train-boost.json"
    params = ["n_estimators=200", "max_depth=3", "learning_rate=0.3", "early_stopping_rounds=5"]
    code, _, text = _cli(env, "vfl", "plan", "--task", "train", *names, "--algorithm", "boosting",
                         *[a for p in params for a in ("--param", p)], "--valid-dataset", "valid",
                         "-o", str(plan))  # fmt: skip
    assert code == 0, text
    # The server's model part is sealed under a key that admits the server running this plan.
    # Without --model-out the server refuses to start: the parties would train and seal parts of a
    # model whose server part is then lost.
    code, _, text = _cli(
        env, "vfl", "server", "--plan", str(plan), "--parties", str(registry), "--tee", "simulation"
    )
    assert code == 3, text
    assert "needs --model-out" in text
    server_policy = _policy_toml(tmp_path / "model-key.toml", server_measurement(env, plan))
    assert _cli(env, "kbs", "key", "create", "vfl-model", "--policy", str(server_policy), "--json")[0] == 0
    train_args = {
        p: ["--data", str(tmp_path / f"{p}.train.csv"), "--valid-data", str(tmp_path / f"{p}.valid.csv"),
            "--model-out", str(tmp_path / f"{p}.sealed")]
        for p in PARTIES
    }  # fmt: skip
    train_args["bank"] += ["--label-column", "y"]
    server_args = ["--kbs", env["ENCLAVEML_KBS_URL"], "--model-out", str(tmp_path / "server.sealed")]
    outputs = run_job(env, tmp_path, plan, registry, train_args, "train", server_args)
    assert "server model sealed" in outputs["server"]
    digest = dict(read_header(tmp_path / "server.sealed").metadata)["model_sha256"]

    # Predicting pins that model; the model owner lets the predict job's server unseal it.
    plan = tmp_path / "predict-boost.json"
    code, _, text = _cli(env, "vfl", "plan", "--task", "predict", *names, "--algorithm", "boosting",
                         "--model", str(tmp_path / "server.sealed"), "-o", str(plan))  # fmt: skip
    assert code == 0, text
    assert json.loads(plan.read_text())["model_sha256"] == digest
    _policy_toml(server_policy, server_measurement(env, plan))
    assert _cli(env, "kbs", "policy", "set", "vfl-model", str(server_policy), "--json")[0] == 0
    predict_args = {
        p: ["--data", str(tmp_path / f"{p}.test.csv"), "--model", str(tmp_path / f"{p}.sealed")]
        for p in PARTIES
    }
    predict_args["bank"] += ["--output", str(tmp_path / "p.npy")]
    run_job(env, tmp_path, plan, registry, predict_args, "predict",
            ["--kbs", env["ENCLAVEML_KBS_URL"], "--model", str(tmp_path / "server.sealed")])  # fmt: skip
    predictions = np.load(tmp_path / "p.npy")
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[parts["test"]], predictions) > 0.9
