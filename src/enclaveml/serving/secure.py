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

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enclaveml._web import RunningServer, attestation_hook, serve_ratls_app, uvicorn_config
from enclaveml.attestation import EvidenceProvider, create_ratls_certificate
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
    return serve_ratls_app(
        app, ratls, name="enclaveml-serve", host=host, port=port, startup_timeout=startup_timeout
    )
