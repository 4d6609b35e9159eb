"""The REST routes of the inference server (state lives in :class:`enclaveml.serving.app.ServerState`).

Inference reads the raw body itself (the binary tensor data extension puts bytes after the JSON,
which no JSON body model can describe), after the model lookup: a request for an unknown model
is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import base64
import re
import zlib
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from enclaveml import __version__
from enclaveml._web import charge_body_bytes
from enclaveml.serving._batching import BatcherClosedError, Overloaded
from enclaveml.serving._engine import ModelNotReadyError
from enclaveml.serving._protocol import (
    InvalidRequestError,
    RequestTooLargeError,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
)
from enclaveml.serving._queue import HandlerError
from enclaveml.serving._tensor_codec import decode_tensors, encode_tensors
from enclaveml.serving._worker_contract import queue_model_key, remote_error

if TYPE_CHECKING:
    import numpy as np

    from enclaveml.serving._engine import OnnxModel
    from enclaveml.serving.app import ServerState

__all__ = ["add_routes"]

# JSON above this many bytes is parsed (and the answer encoded) in a worker thread, so that one
# big JSON request does not stall every other connection on the event loop. Binary tensor data
# is not counted: it becomes arrays that view the body, with no per-element work, and handing
# the request to a thread would cost more than parsing it inline.
_OFFLOAD_JSON_BYTES = 256 * 1024
# JSON output elements above this many are encoded in a worker thread (each becomes text).
MAX_JSON_OUTPUT_ELEMENTS = 1 << 21  # 2M elements: ~40 MB of JSON text
_OFFLOAD_JSON_ELEMENTS = 32 * 1024
_HEX = re.compile(r"[0-9a-fA-F]*")
_NONCE_BYTES = (16, 64)
_MAX_ATTESTATIONS_IN_FLIGHT = 4

_PATH_PARAMETERS = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
]
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "OIP inference request. With the Inference-Header-Content-Length header, the JSON "
        "is followed by the binary tensor data of inputs carrying parameters.binary_data_size.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "example": "FP32"},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def add_routes(app: FastAPI) -> None:
    """Register the routes on ``app`` itself, inference first.

    Routes are matched in order on every request, and an included ``APIRouter`` adds a second
    matching layer; registering directly, hottest first, keeps routing cheap.
    """
    for path, summary, parameters in (
        ("/v2/models/{name}/infer", "Inference", _PATH_PARAMETERS[:1]),
        ("/v2/models/{name}/versions/{version}/infer", "Inference on a model version", _PATH_PARAMETERS),
    ):
        extra = {**_INFER_BODY, "parameters": parameters}
        app.add_api_route(
            path, infer, methods=["POST"], summary=summary, openapi_extra=extra, response_class=Response
        )
    app.add_api_route("/v2", server_metadata, methods=["GET"], summary="Server metadata")
    app.add_api_route("/v2/health/live", live, methods=["GET"], summary="Liveness")
    app.add_api_route("/v2/health/ready", ready, methods=["GET"], summary="Readiness: expected models loaded")
    app.add_api_route("/v2/models/{name}", model_metadata, methods=["GET"], summary="Model metadata")
    app.add_api_route(
        "/v2/models/{name}/versions/{version}",
        model_metadata,
        methods=["GET"],
        summary="Model version metadata",
    )
    app.add_api_route("/v2/models/{name}/ready", model_ready, methods=["GET"], summary="Model readiness")
    app.add_api_route(
        "/v2/models/{name}/versions/{version}/ready",
        model_ready,
        methods=["GET"],
        summary="Model version readiness",
    )
    app.add_api_route(
        "/attestation",
        attestation,
        methods=["GET"],
        summary="Fresh attestation evidence bound to a client nonce",
    )
    app.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.serving
    return state


async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": _state(request).server_name, "version": __version__, "extensions": ["binary_tensor_data"]}


async def live() -> dict[str, bool]:
    return {"live": True}


async def ready(request: Request) -> JSONResponse:
    is_ready = _state(request).ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    state = _state(request)
    metadata = state.repository.get(name, version).metadata()
    metadata["versions"] = state.repository.versions(name)
    return metadata


async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    state = _state(request)
    try:
        state.repository.get(name, version)
    except ModelNotReadyError:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    is_ready = state.started and state.accepting
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


async def infer(request: Request) -> Response:
    # Path parameters are read directly: declaring them in the signature costs FastAPI's parameter
    # validation on every request (a third of the CPU time of a small request), for two strings.
    state = _state(request)
    if not state.accepting:
        raise BatcherClosedError("the server is shutting down; retry on another replica")
    model = state.repository.get(request.path_params["name"], request.path_params.get("version"))
    raw = await request.body()
    body = _decompress(request.headers.get("content-encoding"), raw, state)
    if body is not raw:  # the decompressed copy is held too, until the request ends
        charge_body_bytes(request.scope, len(raw) + len(body))
    del raw
    header_length = parse_header_length(request.headers.get("inference-header-content-length"), len(body))
    json_bytes = len(body) if header_length is None else header_length
    if json_bytes > _OFFLOAD_JSON_BYTES:
        parsed = await asyncio.to_thread(parse_infer_request, body, model, header_length=header_length)
    else:
        parsed = parse_infer_request(body, model, header_length=header_length)
    del body
    if state.queue is not None:
        outputs = await _through_queue(state, model, parsed.inputs, parsed.timeout_s)
    else:
        outputs = await state.batcher(model).submit(parsed.inputs, timeout_s=parsed.timeout_s)
    json_elements = sum(outputs[o.name].size for o in parsed.outputs if not o.binary and o.name in outputs)
    if json_elements > MAX_JSON_OUTPUT_ELEMENTS:
        # As JSON text each element costs ~20 bytes, and its Python list ~25x the array: a small
        # request for a big output (an embedding table) would make the server allocate gigabytes.
        raise InvalidRequestError(
            f"the outputs hold {json_elements} elements, more than {MAX_JSON_OUTPUT_ELEMENTS} are sent "
            "as JSON: request them as binary data (parameters.binary_data_output or per output binary_data)"
        )
    if json_elements > _OFFLOAD_JSON_ELEMENTS:
        encoded = await asyncio.to_thread(encode_infer_response, model, parsed, outputs)
    else:
        encoded = encode_infer_response(model, parsed, outputs)
    headers = (
        {}
        if encoded.header_length is None
        else {"Inference-Header-Content-Length": str(encoded.header_length)}
    )
    return Response(encoded.body, media_type=encoded.content_type, headers=headers)


async def _through_queue(
    state: ServerState, model: OnnxModel, inputs: dict[str, np.ndarray], timeout_s: float | None
) -> dict[str, np.ndarray]:
    """Scale-out: hand the parsed inputs to a worker through the (encrypted) request queue.

    The inputs still view the request body; the queue encrypts their bytes from there.
    """
    assert state.queue is not None
    limit = state.request_timeout_s  # a client's timeout can only shorten the server's, as in-process
    try:
        reply = await state.queue.submit(
            queue_model_key(model.name, model.version),
            encode_tensors(inputs),
            timeout_s=limit if timeout_s is None else min(timeout_s, limit),
        )
    except HandlerError as exc:
        raise remote_error(exc) from None
    return decode_tensors(reply)


def _decompress(encoding: str | None, body: bytes, state: ServerState) -> bytes:
    """Undo gzip/deflate (tritonclient can compress requests), bounded against decompression bombs."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidRequestError(
            f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)"
        )
    limit = state.max_request_bytes
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequestError(f"request body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestTooLargeError(f"decompressed request body exceeds the {limit}-byte limit")
    if not inflater.eof:
        raise InvalidRequestError(f"request body is truncated {encoding} data")
    return data


async def attestation(
    request: Request,
    nonce: str = Query(..., max_length=200, description="16-64 bytes, hex or base64/base64url"),
) -> Response:
    state = _state(request)
    if state.attestation is None:
        return JSONResponse({"error": "this server has no attestation hook"}, status_code=404)
    nonce_bytes = _decode_nonce(nonce)
    # Quotes are expensive and anyone may ask for one: bound the work, do not queue it.
    if state.attestations_in_flight >= _MAX_ATTESTATIONS_IN_FLIGHT:
        raise Overloaded("too many attestation requests in flight", retry_after_s=1.0)
    state.attestations_in_flight += 1
    try:
        evidence = await run_in_threadpool(state.attestation, nonce_bytes)
    finally:
        state.attestations_in_flight -= 1
    return Response(evidence, media_type="application/octet-stream", headers={"Cache-Control": "no-store"})


def _decode_nonce(text: str) -> bytes:
    """Hex when the text is even-length hex, else base64 (standard or URL-safe, padding optional)."""
    if _HEX.fullmatch(text) and len(text) % 2 == 0:
        nonce = bytes.fromhex(text)
    else:
        # A '+' sent unescaped in a query string arrives as a space.
        b64 = text.replace(" ", "+").replace("-", "+").replace("_", "/")
        try:
            nonce = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except ValueError:  # binascii.Error
            raise InvalidRequestError("nonce must be hex or base64") from None
    low, high = _NONCE_BYTES
    if not low <= len(nonce) <= high:
        raise InvalidRequestError(f"nonce must be {low} to {high} bytes, got {len(nonce)}")
    return nonce


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)
