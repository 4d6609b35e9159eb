"""What an HTTP front end and a queue worker agree on besides the payload format (``_tensor_codec``).

* The model key a request names: ``name:version``. Names may contain ``:`` (they are URL path
  segments, and only ``/`` is refused), versions may not (``OnnxModel`` refuses them), so the
  key splits at its last ``:``.
* What a worker's failure means to the client. A worker seals the type name and message of the
  exception its handler raised (``HandlerError``); the front end answers the serving errors below
  with the status they get in process, and any other type as an internal error whose message is
  not shown: the worker's message is trusted only for the serving errors, whose text is written to
  be shown to clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from enclaveml.serving._batching import (
    BatcherClosedError,
    InferenceFailedError,
    InferenceTimeoutError,
    Overloaded,
)
from enclaveml.serving._engine import ModelInputError, ModelNotReadyError, ServingError
from enclaveml.serving._queue import HandlerError

__all__ = ["queue_model_key", "remote_error", "split_queue_model_key"]

_log = logging.getLogger(__name__)

# The worker's own back-off hint does not travel; a second is what the in-process 503s say too.
_RETRY_AFTER_S = 1.0

_REMOTE: dict[str, Callable[[str], ServingError]] = {
    "ModelInputError": ModelInputError,
    # The front end serves the model, so a worker without it is a deployment still rolling out
    # (or a worker started with other models): 503, retry, rather than the client's 404.
    "ModelNotFoundError": lambda message: ModelNotReadyError(f"no queue worker serves it yet ({message})"),
    "ModelNotReadyError": ModelNotReadyError,
    "Overloaded": lambda message: Overloaded(message, retry_after_s=_RETRY_AFTER_S),
    "InferenceTimeoutError": InferenceTimeoutError,
    "BatcherClosedError": BatcherClosedError,
    "InferenceFailedError": InferenceFailedError,
}


def queue_model_key(name: str, version: str) -> str:
    return f"{name}:{version}"


def split_queue_model_key(key: str) -> tuple[str, str | None]:
    """(name, version); a key without ``:`` names the model's only or latest version."""
    name, sep, version = key.rpartition(":")
    return (name, version or None) if sep else (key, None)


def remote_error(exc: HandlerError) -> ServingError:
    """The error to answer a client with for a worker's failure (see the module docstring)."""
    make = _REMOTE.get(exc.error_type)
    if make is not None:
        return make(exc.error_message)
    _log.warning("a queue worker failed on a request with %s", exc.error_type)
    return InferenceFailedError("the worker failed on this request")
