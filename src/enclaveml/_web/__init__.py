"""Web plumbing shared by every enclaveml server: size limits, per-route counters, threaded uvicorn.

Private: the inference server (:mod:`enclaveml.serving`), the FL aggregator (:mod:`enclaveml.fl`)
and the vertical-FL server use it; applications use those packages instead.
"""

from enclaveml._web._attestation import add_bound_attestation_route
from enclaveml._web._limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MIN_BODY_RATE,
    LimitAndCount,
    RouteStats,
    ServingStats,
    body_read_timeout,
    body_timeout_message,
    charge_body_bytes,
)
from enclaveml._web._protocol import DeadlineHttpProtocol
from enclaveml._web._server import (
    RunningServer,
    ServerThread,
    attestation_hook,
    raise_open_file_limit,
    serve_ratls_app,
    start_in_thread,
    uvicorn_config,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MIN_BODY_RATE",
    "DeadlineHttpProtocol",
    "LimitAndCount",
    "RouteStats",
    "RunningServer",
    "ServerThread",
    "ServingStats",
    "add_bound_attestation_route",
    "attestation_hook",
    "body_read_timeout",
    "body_timeout_message",
    "charge_body_bytes",
    "raise_open_file_limit",
    "serve_ratls_app",
    "start_in_thread",
    "uvicorn_config",
]
