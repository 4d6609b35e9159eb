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

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enclaveml._urls import certificate_names
from enclaveml._web import RunningServer, attestation_hook, serve_ratls_app, uvicorn_config
from enclaveml.attestation import EvidenceProvider, create_ratls_certificate
from enclaveml.crypto import DataKeyUnwrapper, SealedHeader
from enclaveml.crypto.sealed import unseal_file_with_header
from enclaveml.errors import ConfigurationError
from enclaveml.serving._engine import ModelRepository, OnnxModel
from enclaveml.serving.app import create_app

__all__ = [
    "BATCHABLE_METADATA",
    "MODEL_NAME_METADATA",
    "RunningServer",
    "attestation_hook",
    "load_sealed_models",
    "serve_in_thread",
    "uvicorn_config",
]

MODEL_NAME_METADATA = "model_name"
"""Sealed-header metadata naming the model an artifact may be served as (checked once verified)."""
_log = logging.getLogger(__name__)

BATCHABLE_METADATA = "batchable"
"""Sealed-header metadata, ``"true"``: the owner says rows along dim 0 are independent, so requests
of different clients may be run as one batch (``enclaveml seal --batchable``)."""


def load_sealed_models(
    models: Mapping[str, str | Path],
    unwrapper: DataKeyUnwrapper,
    *,
    intra_op_threads: int | None = None,
) -> ModelRepository:
    """Unseal each ``name -> path`` into memory and load it into ONNX Runtime; nothing touches disk.

    The checks run on the header that was verified with the content, not on one read before: an
    artifact sealed with a ``model_name`` (``enclaveml seal --model-name``) loads only under that
    name, so the host cannot swap two sealed models between the names they are served under.

    Requests of different clients are batched together only for artifacts sealed with
    ``batchable`` (``enclaveml seal --batchable``): a model that mixes rows along dim 0 (a set,
    sequence or attention over the batch axis, a normalisation over it) would otherwise give one
    client an answer computed from another's input. Only the owner knows; the host cannot turn it on.
    """
    if not models:
        raise ConfigurationError("at least one --model NAME=PATH is required")
    repository = ModelRepository(expected=models.keys())
    for name, path in models.items():
        header, model_bytes = unseal_file_with_header(Path(path), unwrapper=unwrapper)
        try:
            batchable = _check_model_header(header, name, path)
            model = OnnxModel.from_bytes(
                name, model_bytes, intra_op_threads=intra_op_threads, batchable=batchable
            )
        finally:
            del model_bytes  # ORT holds its own copy; drop ours now rather than at the end of the loop.
        repository.add(model)
    return repository


def _check_model_header(header: SealedHeader, name: str, path: str | Path) -> bool:
    """Check content type and name; return whether the owner allows batching across requests."""
    if header.content_type not in ("application/onnx", "application/octet-stream"):
        raise ConfigurationError(f"sealed artifact {path} holds {header.content_type!r}, not an ONNX model")
    sealed_as = header.metadata.get(MODEL_NAME_METADATA)
    if sealed_as is not None and sealed_as != name:
        raise ConfigurationError(
            f"sealed artifact {path} was sealed as model {sealed_as!r}, not {name!r}: "
            "refusing to serve one model under another's name"
        )
    batchable = header.metadata.get(BATCHABLE_METADATA)
    if batchable not in (None, "true"):
        raise ConfigurationError(
            f"sealed artifact {path} has batchable={batchable!r}; only 'true' is defined"
        )
    if batchable is None:
        _log.info("model %r runs one request at a time (sealed without --batchable)", name)
    return batchable == "true"


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
    dns_names, ip_addresses = certificate_names(host)
    ratls = create_ratls_certificate(provider, dns_names=dns_names, ip_addresses=ip_addresses)
    app = create_app(models, attestation=attestation_hook(provider, ratls), **app_options)
    return serve_ratls_app(
        app, ratls, name="enclaveml-serve", host=host, port=port, startup_timeout=startup_timeout
    )
