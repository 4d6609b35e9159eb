"""Assembling the confidential inference server: attest, obtain keys, unseal in memory, serve over RA-TLS.

Order of operations, and where each secret lives:

1. the TEE's evidence provider is the only source of evidence (simulation only when named);
2. every sealed model names its key id and version in its header (no key needed to read it);
   the key broker releases each key only after verifying evidence bound to a fresh nonce and
   an ephemeral HPKE key (``KeyBrokerClient``) — keys live in this process's memory only;
3. each model is decrypted into memory and loaded into ONNX Runtime from bytes: plaintext
   weights never reach the file system;
4. a fresh RA-TLS certificate binds the server's TLS key into evidence; the key is handed to
   uvicorn through an anonymous memory file (``memfd``), never a path on disk;
5. ``GET /attestation?nonce=`` returns new evidence bound to the client's nonce and the same key.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import uvicorn
from fastapi import FastAPI

from enclaveml.attestation import EvidenceProvider, RatlsCertificate, create_ratls_certificate
from enclaveml.attestation.ratls import bind_public_key
from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.crypto import DataKeyUnwrapper, read_header, unseal_file_to_bytes
from enclaveml.errors import ConfigurationError
from enclaveml.serving._engine import ModelRepository, OnnxModel
from enclaveml.serving.app import create_app

__all__ = ["RunningServer", "attestation_hook", "load_sealed_models", "serve_in_thread", "uvicorn_config"]


def load_sealed_models(
    models: Mapping[str, str | Path],
    unwrapper: DataKeyUnwrapper,
    *,
    intra_op_threads: int | None = None,
) -> ModelRepository:
    """Unseal each ``name -> path`` into memory and load it into ONNX Runtime; nothing touches disk."""
    if not models:
        raise ConfigurationError("at least one --model NAME=PATH is required")
    repository = ModelRepository(expected=models.keys())
    for name, path in models.items():
        header = read_header(Path(path))
        if header.content_type not in ("application/onnx", "application/octet-stream"):
            raise ConfigurationError(
                f"sealed artifact {path} holds {header.content_type!r}, not an ONNX model"
            )
        model_bytes = unseal_file_to_bytes(Path(path), unwrapper=unwrapper)
        repository.add(OnnxModel.from_bytes(name, model_bytes, intra_op_threads=intra_op_threads))
        del model_bytes  # ORT holds its own copy; drop ours now rather than at the end of the loop.
    return repository


def attestation_hook(provider: EvidenceProvider, ratls: RatlsCertificate) -> Callable[[bytes], bytes]:
    """The ``/attestation`` handler: fresh evidence bound to the client's nonce and the TLS key."""
    public_key = ratls.private_key.public_key()

    def hook(nonce: bytes) -> bytes:
        binding = bind_public_key(provider, public_key, nonce=nonce)
        return bytes(cbor2.dumps({"evidence": binding.evidence, "endorsements": binding.endorsements}))

    return hook


@contextlib.contextmanager
def uvicorn_config(
    app: FastAPI, ratls: RatlsCertificate, *, host: str, port: int
) -> Iterator[uvicorn.Config]:
    """A uvicorn config serving ``app`` with the RA-TLS certificate; the key stays in memory files."""
    with in_memory_key_files(ratls.certificate_pem, ratls.private_key_pem()) as (certfile, keyfile):
        yield uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
        )


@dataclass
class RunningServer:
    """A server started by :func:`serve_in_thread`; ``stop()`` shuts it down."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    ratls: RatlsCertificate
    app: FastAPI
    _exit: contextlib.ExitStack = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self._exit.close()


def serve_in_thread(
    models: ModelRepository | Mapping[str, OnnxModel],
    provider: EvidenceProvider,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 30.0,
    **app_options: Any,
) -> RunningServer:
    """Start the RA-TLS inference server in a background thread (tests, the demo, embedding)."""
    ratls = create_ratls_certificate(provider, dns_names=("localhost",))
    app = create_app(models, attestation=attestation_hook(provider, ratls), **app_options)
    stack = contextlib.ExitStack()
    config = stack.enter_context(uvicorn_config(app, ratls, host=host, port=port))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="enclaveml-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            stack.close()
            raise ConfigurationError("the inference server did not start")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"https://{host}:{bound}", server, thread, ratls, app, stack)
