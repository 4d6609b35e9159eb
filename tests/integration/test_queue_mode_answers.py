"""Scale-out answers what in-process serving answers: statuses, timeouts, text tensors, model names.

A plaintext front end (real uvicorn on 127.0.0.1) puts requests on a real Redis through
:class:`RedisStreamsQueue`; a :class:`QueueWorker` on its own event loop in this process serves
them. Each case is one a client could send to either kind of server and that once came back
differently through the queue: a worker's typed errors all turned into 500, a client's
``timeout`` parameter could lengthen the server's (and leave a completion marker in Redis for
as long as it asked), text (BYTES) tensors and model names with ``:`` could not travel.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import pytest
import redis
import uvicorn
from onnx import TensorProto, helper, numpy_helper

from enclaveml._web import start_in_thread
from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving import ModelRepository, OnnxModel, create_app
from enclaveml.serving._redis_queue import RedisStreamsQueue
from enclaveml.serving.worker import QueueWorker
from tests.serving_models import digits_model

TABLE = np.arange(40, dtype=np.float32).reshape(10, 4)
DONE_MARGIN_MS = 60_000  # RedisLayout's default done_margin_ms


def _bytes(model: onnx.ModelProto) -> bytes:
    model.ir_version = 10
    return model.SerializeToString()


def gather_model() -> bytes:
    """rows = TABLE[idx]: an index out of range is the client's error, which ORT reports."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    return _bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def text_model() -> bytes:
    """A string tensor in, the same out (what e.g. text-classification pipelines take)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])],
    )
    return _bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def models() -> list[OnnxModel]:
    return [
        OnnxModel.from_bytes("gather", gather_model(), intra_op_threads=1),
        OnnxModel.from_bytes("text", text_model(), intra_op_threads=1),
        OnnxModel.from_bytes("digits:v2", digits_model()[0], intra_op_threads=1),
    ]


def run_worker(redis_url: str, key: KeyHandle, served: list[OnnxModel]) -> Callable[[], None]:
    """A QueueWorker on its own event loop in a thread; returns the function that stops it."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def serve() -> None:
        async with RedisStreamsQueue(redis_url, cluster_key=key) as queue:
            worker = QueueWorker(ModelRepository(served), queue, max_batch_size=4, max_delay_ms=1.0)
            ready.set()
            await worker.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(15)

    def stopper() -> None:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()

    return stopper


def front_end(redis_url: str, key: KeyHandle, **options: object) -> Iterator[httpx.Client]:
    queue = RedisStreamsQueue(redis_url, cluster_key=key, **options)  # type: ignore[arg-type]
    app = create_app(ModelRepository(models()), queue=queue, request_timeout_s=1.0, max_delay_ms=1)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", http="httptools", log_level="error")
    running = start_in_thread(config, name="queue-front-end", startup_timeout=15)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            yield client
    finally:
        running.stop(15)


@pytest.fixture
def cluster_key() -> KeyHandle:
    return KeyHandle.generate("cluster")


@pytest.fixture
def served(redis_url: str, cluster_key: KeyHandle) -> Iterator[httpx.Client]:
    """Front end plus a worker that serves every model the front end has."""
    stop = run_worker(redis_url, cluster_key, models())
    try:
        yield from front_end(redis_url, cluster_key)
    finally:
        stop()


def infer(
    client: httpx.Client, model: str, tensor: dict[str, object], **parameters: object
) -> httpx.Response:
    body: dict[str, object] = {"inputs": [tensor]}
    if parameters:
        body["parameters"] = parameters
    return client.post(f"/v2/models/{model}/infer", json=body)


def test_a_worker_side_input_error_is_400_as_in_process(served: httpx.Client) -> None:
    good = infer(served, "gather", {"name": "idx", "shape": [2], "datatype": "INT64", "data": [3, 9]})
    assert good.status_code == 200, good.text
    np.testing.assert_array_equal(np.array(good.json()["outputs"][0]["data"]).reshape(2, 4), TABLE[[3, 9]])
    bad = infer(served, "gather", {"name": "idx", "shape": [1], "datatype": "INT64", "data": [12345]})
    assert bad.status_code == 400, bad.text
    assert "rejected the input values" in bad.json()["error"]


def test_text_tensors_travel_through_the_queue(served: httpx.Client) -> None:
    words = ["hello", "", "naïve café", "x" * 5000]
    response = infer(served, "text", {"name": "text", "shape": [4], "datatype": "BYTES", "data": words})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["data"] == words


def test_a_model_name_with_a_colon_is_served(served: httpx.Client) -> None:
    rows = digits_model()[1][:2]
    tensor = {"name": "X", "shape": [2, 64], "datatype": "FP32", "data": rows.ravel().tolist()}
    response = infer(served, "digits:v2", tensor)
    assert response.status_code == 200, response.text


def test_a_client_timeout_cannot_outlast_the_servers(served: httpx.Client, redis_url: str) -> None:
    """A timeout far beyond the server's 1 s is cut to it: the completion marker expires with it."""
    tensor = {"name": "idx", "shape": [1], "datatype": "INT64", "data": [1]}
    for timeout_us in (4_000_000, 10**20, 10**400):
        response = infer(served, "gather", tensor, timeout=timeout_us)
        assert response.status_code == 200, response.text
    markers = redis.Redis.from_url(redis_url)
    ttls = [markers.pttl(k) for k in markers.scan_iter(match="*:done:*")]
    assert len(ttls) == 3
    assert all(0 < ttl <= 1_000 + DONE_MARGIN_MS for ttl in ttls), ttls


def test_without_a_worker_a_long_client_timeout_still_ends_at_the_servers(
    redis_url: str, cluster_key: KeyHandle
) -> None:
    tensor = {"name": "idx", "shape": [1], "datatype": "INT64", "data": [1]}
    for client in front_end(redis_url, cluster_key):
        started = time.monotonic()
        response = infer(client, "gather", tensor, timeout=4_000_000)
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 3.0
        assert client.get("/v2/health/live").status_code == 200


def test_a_worker_without_the_model_is_a_503_to_retry(redis_url: str, cluster_key: KeyHandle) -> None:
    stop = run_worker(redis_url, cluster_key, [OnnxModel.from_bytes("gather", gather_model())])
    try:
        for client in front_end(redis_url, cluster_key):
            text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}
            response = infer(client, "text", text)
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "1"
            assert "no queue worker serves it yet" in response.json()["error"]
    finally:
        stop()


def test_a_full_front_end_answers_429_with_retry_after(redis_url: str, cluster_key: KeyHandle) -> None:
    tensor = {"name": "idx", "shape": [1], "datatype": "INT64", "data": [1]}
    for client in front_end(redis_url, cluster_key, max_in_flight=1):
        with ThreadPoolExecutor(4) as pool:  # no worker: the first request holds the only slot
            responses = list(pool.map(lambda _: infer(client, "gather", tensor), range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [429, 429, 429, 504], statuses
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
