"""Serving leaves no reference cycles per request, answered or refused, in-process or through the queue.

``enclaveml._collector`` lets serving processes run the cycle collector rarely (a young pass per
10,000 surplus container objects instead of 700). That is only harmless while requests do not
leave cycles behind: a cycle holding a request body would keep hundreds of kilobytes alive
until the next pass. Each case below sends requests with the collector off, then collects with
DEBUG_SAVEALL and asserts that nothing unreachable was found. Real uvicorn servers on 127.0.0.1
(and a real Redis and queue worker for the front end); stdlib ``http.client`` as the client,
which makes no cycles of its own.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization

from enclaveml._web import start_in_thread
from enclaveml.attestation.tls import pinned_ssl_context
from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving import ModelRepository, OnnxModel, create_app
from enclaveml.serving._oip_codec import encode_request
from enclaveml.serving._redis_queue import RedisStreamsQueue
from enclaveml.serving.secure import serve_in_thread
from enclaveml.serving.worker import QueueWorker
from tests.serving_models import digits_model

INFER = "/v2/models/digits/infer"
REQUESTS = 40

Connect = Callable[[], http.client.HTTPConnection]


def _cases(rows: np.ndarray) -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    """name -> (path, body, headers, expected status)."""
    body, headers = encode_request({"X": rows[:4]})
    wide, wide_headers = encode_request({"X": np.zeros((1, rows.shape[1] + 1), np.float32)})
    json_headers = {"Content-Type": "application/json"}
    tensor = {"name": "X", "shape": [1, rows.shape[1]], "datatype": "FP32", "data": rows[0].tolist()}
    return {
        "answered (binary)": (INFER, body, headers, 200),
        "answered (JSON)": (INFER, json.dumps({"inputs": [tensor]}).encode(), json_headers, 200),
        "wrong shape": (INFER, wide, wide_headers, 400),
        "malformed JSON": (INFER, b'{"inputs": [', json_headers, 400),
        "unknown model": ("/v2/models/nope/infer", body, headers, 404),
        "oversized": (INFER, b"x" * (300 * 1024), json_headers, 413),
    }


def _unreachable_after(
    connect: Connect, path: str, body: bytes, headers: dict[str, str], status: int
) -> list[Any]:
    """Send REQUESTS requests with the collector off; return what a full collection then finds."""
    gc.collect()
    gc.disable()
    try:
        seen = set()
        connection = connect()
        for _ in range(REQUESTS):
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            seen.add(response.status)
            if response.will_close:
                connection.close()
                connection = connect()
        connection.close()
        assert seen == {status}
        time.sleep(0.2)  # the server finishes its side of the last exchange
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _assert_no_cycles(connect: Connect, rows: np.ndarray) -> None:
    for name, (path, body, headers, status) in _cases(rows).items():
        garbage = _unreachable_after(connect, path, body, headers, status)
        kinds = collections.Counter(type(o).__name__ for o in garbage).most_common(8)
        assert not garbage, (
            f"{name}: {len(garbage)} objects in reference cycles after {REQUESTS} requests: {kinds}"
        )


def _repository() -> ModelRepository:
    return ModelRepository([OnnxModel.from_bytes("digits", digits_model()[0], intra_op_threads=1)])


def test_in_process_serving_leaves_no_cycles() -> None:
    app = create_app(_repository(), max_request_bytes=256 * 1024, max_delay_ms=1)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", http="httptools", log_level="error")
    running = start_in_thread(config, name="garbage-serve", startup_timeout=15)
    try:
        port = int(running.url.rsplit(":", 1)[1])
        _assert_no_cycles(
            lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30), digits_model()[1]
        )
    finally:
        running.stop(15)


@pytest.fixture
def worker_thread(redis_url: str) -> Iterator[KeyHandle]:
    """A QueueWorker serving the digits model from Redis, on its own event loop in this process."""
    key = KeyHandle.generate("cluster")
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def serve() -> None:
        async with RedisStreamsQueue(redis_url, cluster_key=key) as queue:
            worker = QueueWorker(_repository(), queue, max_batch_size=8, max_delay_ms=1.0)
            ready.set()
            await worker.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(15)
    try:
        yield key
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()


def test_queue_front_end_and_worker_leave_no_cycles(
    redis_url: str, worker_thread: KeyHandle, sim_provider
) -> None:
    queue = RedisStreamsQueue(redis_url, cluster_key=worker_thread)
    running = serve_in_thread(
        _repository(), sim_provider, queue=queue, max_request_bytes=256 * 1024, request_timeout_s=30.0
    )
    try:
        context = pinned_ssl_context(running.ratls.certificate.public_bytes(serialization.Encoding.DER))
        port = int(running.url.rsplit(":", 1)[1])
        _assert_no_cycles(
            lambda: http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30),
            digits_model()[1],
        )
    finally:
        running.stop(15)
