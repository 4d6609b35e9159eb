"""`enclaveml demo`: the main job end to end, on embedded defaults, on this machine.

A model owner trains a digits classifier, seals it, and keeps its key in a key broker
(SQLite, HTTPS on 127.0.0.1). An inference server inside a (simulated) TEE attests to the
broker, receives the key HPKE-sealed to an ephemeral key bound in its evidence, unseals the
model in memory and serves it over RA-TLS. A client verifies the server's evidence and a
fresh nonce before sending the held-out set, then prints accuracy, claims, and where every
secret lived. The simulation TEE protects nothing; the demo shows the flow, not protection.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import uvicorn
from rich.table import Table

from enclaveml._files import write_atomically
from enclaveml._web import DeadlineHttpProtocol, start_in_thread
from enclaveml.attestation import (
    AllOf,
    DebugMode,
    EvidenceVerifier,
    MeasurementAllowlist,
    UnsafeAllowSimulation,
)
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.cli._console import claims_table, console, simulation_banner
from enclaveml.crypto import seal_bytes
from enclaveml.errors import KeyReleaseDeniedError, PolicyRejectedError
from enclaveml.kms import KeyBrokerAdmin, KeyBrokerClient
from enclaveml.kms._rootkey import RootKey
from enclaveml.kms._tlscert import self_signed_certificate
from enclaveml.kms.server import BrokerConfig, create_app
from enclaveml.serving.client import Client
from enclaveml.serving.secure import (
    BATCHABLE_METADATA,
    MODEL_NAME_METADATA,
    load_sealed_models,
    serve_in_thread,
)

_MODEL = "digits"
_KEY_ID = "digits-model"
_SERVER_CONFIG = {"models": {_MODEL: "digits.sealed"}}


def _train() -> tuple[bytes, np.ndarray, np.ndarray]:
    # scikit-learn and skl2onnx are untyped and only needed here: load them on use, as Any.
    load_digits = importlib.import_module("sklearn.datasets").load_digits
    LogisticRegression = importlib.import_module("sklearn.linear_model").LogisticRegression
    train_test_split = importlib.import_module("sklearn.model_selection").train_test_split
    to_onnx = importlib.import_module("skl2onnx").to_onnx

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=7, stratify=y)
    model = LogisticRegression(max_iter=500).fit(x_train, y_train)
    onx = to_onnx(model, x_train[:1], options={"zipmap": False}, target_opset=17)
    onx.ir_version = min(onx.ir_version, 10)  # onnxruntime 1.31 reads IR <= 10
    return bytes(onx.SerializeToString()), x_test, y_test


@contextlib.contextmanager
def _broker(workdir: Path, verifier: EvidenceVerifier) -> Iterator[tuple[str, Path, str]]:
    """A key broker on 127.0.0.1 over HTTPS; yields (url, CA certificate to pin, admin token)."""
    cert = workdir / "kbs-cert.pem"
    made = self_signed_certificate()
    made.write_certificate(cert)
    app = create_app(
        BrokerConfig(db_path=workdir / "kbs" / "kbs.db", root_key=RootKey.generate(), verifier=verifier)
    )
    token = app.state.broker.create_token(
        "demo-owner", ["keys:write", "keys:read", "keys:wrap", "policy:write"]
    )
    # The broker's TLS key stays in memory (an anonymous memory file), as in `kbs serve`.
    with in_memory_key_files(made.certificate_pem, made.private_key_pem) as (_, key):
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            ssl_certfile=str(cert),
            ssl_keyfile=key,
            log_level="warning",
            loop="uvloop",
            http=DeadlineHttpProtocol,
        )
        running = start_in_thread(config, name="enclaveml-demo-kbs")
    try:
        yield running.url, cert, token
    finally:
        running.stop()


def run_demo() -> None:
    """Run the demo, printing each step; raises if any step does not behave as it must."""
    simulation_banner(console)
    started = time.perf_counter()
    sim_key = SimulationKey.generate()  # in memory only: the demo leaves no key behind
    server_tee = SimulationProvider(key=sim_key, entry_point="enclaveml serve", config=_SERVER_CONFIG)
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    # Both the broker (for the model key) and the client (for its data) accept exactly this workload.
    policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([server_tee.measurement]), DebugMode()))

    with tempfile.TemporaryDirectory(prefix="enclaveml-demo-") as tmp:
        workdir = Path(tmp)
        console.rule("1/6 model owner: train a digits classifier and export it to ONNX")
        model_bytes, x_test, y_test = _train()
        console.print(f"ONNX model: {len(model_bytes)} bytes, held-out set: {len(x_test)} images")

        with _broker(workdir, verifier) as (kbs_url, kbs_ca, token):
            console.rule("2/6 key broker: create the model key with its release policy")
            admin = KeyBrokerAdmin(kbs_url, token, verify=str(kbs_ca))
            admin.create_key(_KEY_ID, policy)
            measurement = server_tee.measurement.hex()
            console.print(
                f"broker {kbs_url}: key '{_KEY_ID}' releases only to measurement {measurement[:24]}..."
            )

            console.rule(
                "3/6 model owner: seal the model (the broker wraps its data key; plaintext stays in memory)"
            )
            sealed = workdir / "digits.sealed"
            artifact = seal_bytes(
                model_bytes,
                wrapper=admin,
                key_id=_KEY_ID,
                content_type="application/onnx",
                # Served only under this name; its rows (digits images) are independent: batched.
                metadata={MODEL_NAME_METADATA: _MODEL, BATCHABLE_METADATA: "true"},
            )
            write_atomically(sealed, artifact)
            admin.close()
            console.print(f"sealed artifact: {sealed.name}, {sealed.stat().st_size} bytes (Cobblestone-256)")

            console.rule("4/6 server in the TEE: attest to the broker, receive the key, unseal in memory")
            with KeyBrokerClient(kbs_url, server_tee, verify=str(kbs_ca)) as kbs:
                repository = load_sealed_models({_MODEL: sealed}, kbs)
            impostor = SimulationProvider(
                key=sim_key, entry_point="enclaveml serve", config={"models": "other"}
            )
            try:
                with KeyBrokerClient(kbs_url, impostor, verify=str(kbs_ca)) as other:
                    other.release(_KEY_ID)
            except KeyReleaseDeniedError as exc:
                console.print(
                    f"[yellow]a workload with another measurement: key DENIED[/yellow] (rule '{exc.rule}')"
                )
            else:  # pragma: no cover - would be a security bug
                raise RuntimeError("the broker released the key to the wrong workload")

            console.rule("5/6 serve over RA-TLS; the client verifies before sending anything")
            running = serve_in_thread(repository, server_tee, max_batch_size=32, max_delay_ms=1.0)
            try:
                try:
                    Client(
                        running.url,
                        policy=UnsafeAllowSimulation(MeasurementAllowlist([b"\x00" * 48])),
                        verifier=verifier,
                    )
                except PolicyRejectedError as exc:
                    console.print(
                        "[yellow]a client expecting other code: REFUSED[/yellow] before sending data "
                        f"(rule '{exc.rule}')"
                    )
                else:  # pragma: no cover - would be a security bug
                    raise RuntimeError("a client accepted a server outside its policy")
                with Client(running.url, policy=policy, verifier=verifier) as client:
                    console.print(claims_table(client.claims.to_dict(), title="server claims (fresh nonce)"))
                    console.rule("6/6 predict the held-out set")
                    labels = np.concatenate(
                        [
                            client.infer(_MODEL, {"X": x_test[i : i + 64]})["label"]
                            for i in range(0, len(x_test), 64)
                        ]
                    )
            finally:
                running.stop()
    accuracy = float((labels == y_test).mean())
    console.print(f"[bold]accuracy on {len(y_test)} held-out digits: {accuracy:.4f}[/bold]")
    console.print(_secrets_table())
    console.print(
        f"done in {time.perf_counter() - started:.1f} s — simulated TEE: this run protected nothing."
    )
    if accuracy < 0.9:
        raise RuntimeError(f"unexpected accuracy {accuracy:.3f}")


def _secrets_table() -> Table:
    table = Table(title="where each secret lived", show_header=True, header_style="bold")
    table.add_column("secret")
    table.add_column("where it was in plaintext")
    table.add_column("everywhere else")
    table.add_row(
        "model weights",
        "owner's process memory; server (TEE) memory, in ONNX Runtime",
        "sealed file (Cobblestone-256)",
    )
    table.add_row(
        "model key (KEK)",
        "broker memory; server (TEE) memory",
        "broker DB wrapped by the root key; HPKE-sealed in transit",
    )
    table.add_row(
        "per-file data key",
        "owner memory while sealing; server (TEE) memory",
        "wrapped by the KEK in the sealed header",
    )
    table.add_row("broker root key", "broker memory (generated for the demo)", "nowhere")
    table.add_row(
        "server TLS private key",
        "server (TEE) memory (memfd)",
        "nowhere; its public key is bound in the evidence",
    )
    table.add_row(
        "client inputs and predictions", "client memory; server (TEE) memory", "TLS to the attested key only"
    )
    return table
