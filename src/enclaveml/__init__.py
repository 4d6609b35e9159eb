"""enclaveml: confidential machine learning on trusted execution environments.

The top level holds the client SDK of the inference server (``enclaveml.Client``,
``enclaveml.AsyncClient``: verify the server's attestation, then send data) and the root of the
error hierarchy. The SDK is imported on first use, so ``import enclaveml`` (and the CLI) stays
light; everything else lives in its subpackage (attestation, crypto, kms, serving, fl).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from enclaveml.errors import EnclaveMLError

if TYPE_CHECKING:
    from enclaveml.serving.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "EnclaveMLError", "__version__"]
__version__ = "0.1.0"

_LAZY = {"Client", "AsyncClient"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from enclaveml.serving import client

        return getattr(client, name)
    raise AttributeError(f"module 'enclaveml' has no attribute {name!r}")
