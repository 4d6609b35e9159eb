"""The engine (ONNX from memory) and the dynamic batcher: merging, limits, timeouts, failures, shutdown."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Mapping

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enclaveml.errors import ConfigurationError
from enclaveml.serving import (
    BatcherClosedError,
    DynamicBatcher,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelRepository,
    OnnxModel,
    Overloaded,
)


class FakeModel:
    """Doubles its input; records every batch; sleeps and fails on demand (in the worker thread)."""

    def __init__(self, *, batchable: bool = True, delay_s: float = 0.0, name: str = "fake") -> None:
        self.name = name
        self.batchable = batchable
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.peak = 0  # the most runs in progress at one time
        self._lock = threading.Lock()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._run(inputs)
        finally:
            with self._lock:
                self.running -= 1

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        time.sleep(self.delay_s)
        if (x < 0).any():
            raise RuntimeError("negative input")
        return {"y": x * 2, "rowsum": x.sum(axis=1)}


def rows(n: int, start: float = 0.0, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)}


async def gather_all(batcher: DynamicBatcher, requests: list[dict[str, np.ndarray]]) -> list[object]:
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


def test_concurrent_requests_share_one_run_and_get_their_own_rows_back() -> None:
    model = FakeModel()

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=16, max_delay_ms=50)
        results = await gather_all(batcher, [rows(1, 10 * i) for i in range(6)] + [rows(3, 100)])
        await batcher.close()
        assert batcher.stats.batches == 1
        assert batcher.stats.batch_sizes == {9: 1}
        assert batcher.stats.completed == 7
        return results

    results = asyncio.run(scenario())
    assert model.batches == [9]
    for i, result in enumerate(results[:6]):
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], rows(1, 10 * i)["x"] * 2)
    last = results[6]
    assert isinstance(last, dict)
    assert last["y"].shape == (3, 3)
    np.testing.assert_array_equal(last["rowsum"], rows(3, 100)["x"].sum(axis=1))
    assert all(name.startswith("ort-fake") for name in model.threads)


def test_batches_respect_max_batch_size_and_compatibility() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=20)
        requests = [rows(1, i) for i in range(10)] + [rows(1, 0, width=5), rows(1, 0, width=5)]
        results = await gather_all(batcher, requests)
        await batcher.close()
        assert all(isinstance(r, dict) for r in results)

    asyncio.run(scenario())
    assert max(model.batches) <= 4
    assert sum(model.batches) == 12
    assert 2 in model.batches  # the two width-5 requests merged with each other only


def test_a_model_without_a_batch_dimension_runs_one_request_at_a_time() -> None:
    model = FakeModel(batchable=False)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=20)
        await gather_all(batcher, [rows(2, i) for i in range(5)])
        await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [2] * 5


def test_a_full_queue_rejects_at_once_with_a_retry_hint() -> None:
    model = FakeModel(delay_s=0.05)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=1, max_delay_ms=0, max_queue=2)
        results = await gather_all(batcher, [rows(1, i) for i in range(8)])
        rejected = [r for r in results if isinstance(r, Overloaded)]
        assert rejected
        assert all(r.retry_after_s >= 1 for r in rejected)
        assert batcher.stats.rejected == len(rejected)
        assert batcher.stats.completed == 8 - len(rejected)
        await batcher.close()

    asyncio.run(scenario())


def test_timed_out_requests_leave_the_queue_and_never_run() -> None:
    model = FakeModel()
    model.gate.clear()  # the first batch blocks until released

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=1, max_delay_ms=0, max_queue=10)
        first = asyncio.ensure_future(batcher.submit(rows(1, 1)))
        await asyncio.sleep(0.05)
        with pytest.raises(InferenceTimeoutError, match="did not answer"):
            await batcher.submit(rows(1, 2), timeout_s=0.05)
        assert batcher.stats.queued == 0
        assert batcher.stats.timed_out == 1
        model.gate.set()
        await first
        await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [1]


def test_cancelled_requests_are_dropped() -> None:
    model = FakeModel()
    model.gate.clear()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=0)
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(batcher.submit(rows(1, 5)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        assert batcher.stats.cancelled == 1
        assert batcher.stats.queued == 0
        model.gate.set()
        await first
        await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [1]


def test_a_failing_batch_fails_only_the_offending_request(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeModel()

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=50)
        results = await gather_all(batcher, [rows(1, 1), rows(1, -9), rows(1, 4)])
        assert batcher.stats.failed == 1
        await batcher.close()
        return results

    ok1, bad, ok2 = asyncio.run(scenario())
    assert isinstance(bad, InferenceFailedError)
    # ORT's message names graph nodes and shapes: neither sent to the client nor logged (the log
    # leaves the TEE); the log says which model failed and the exception's type.
    assert "negative" not in str(bad)
    assert "model fake failed on a request: RuntimeError" in caplog.text
    assert "negative" not in caplog.text
    assert isinstance(ok1, dict)
    assert isinstance(ok2, dict)
    assert model.batches[0] == 3  # tried together first, then one by one


def test_outputs_that_are_not_split_by_rows_fall_back_to_single_runs() -> None:
    class Pooling(FakeModel):
        def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.batches.append(inputs["x"].shape[0])
            return {"mean": inputs["x"].mean(axis=0)}

    model = Pooling()

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=50)
        results = await gather_all(batcher, [rows(2, 0), rows(2, 100)])
        await batcher.close()
        return results

    first, second = asyncio.run(scenario())
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    np.testing.assert_array_equal(second["mean"], rows(2, 100)["x"].mean(axis=0))


def test_the_event_loop_keeps_running_while_a_batch_computes() -> None:
    model = FakeModel(delay_s=0.3)

    async def scenario() -> int:
        batcher = DynamicBatcher(model)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await batcher.submit(rows(1))
        task.cancel()
        await batcher.close()
        return ticks

    assert asyncio.run(scenario()) >= 10


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_instances_run_that_many_full_batches_at_once(instances: int) -> None:
    model = FakeModel(delay_s=0.2)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0, instances=instances)
        results = await gather_all(batcher, [rows(1, 10 * i) for i in range(6)])
        await batcher.close()
        return results

    started = time.monotonic()
    results = asyncio.run(scenario())
    elapsed = time.monotonic() - started
    # Batches are still gathered whole while other instances compute: three batches of two.
    assert model.batches == [2, 2, 2]
    assert model.peak == instances
    assert len(model.threads) == instances
    assert elapsed < 0.2 * math.ceil(3 / instances) + 0.15
    for i, result in enumerate(results):
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], rows(1, 10 * i)["x"] * 2)


@pytest.mark.parametrize("instances", [1, 2])
def test_close_finishes_running_batches_fails_the_queue_and_refuses_new_requests(instances: int) -> None:
    model = FakeModel()
    model.gate.clear()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=1, max_delay_ms=0, instances=instances)
        running = [asyncio.ensure_future(batcher.submit(rows(1, i))) for i in range(instances)]
        await asyncio.sleep(0.05)
        assert model.running == instances
        queued = asyncio.ensure_future(batcher.submit(rows(1, 3)))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        model.gate.set()
        await closing
        for request in running:
            assert isinstance(await request, dict)  # every running batch finishes
        with pytest.raises(BatcherClosedError):
            await queued
        with pytest.raises(BatcherClosedError):
            await batcher.submit(rows(1))

    asyncio.run(scenario())
    assert model.batches == [1] * instances


def test_limits_are_validated() -> None:
    for kwargs in (
        {"max_batch_size": 0},
        {"max_queue": 0},
        {"max_delay_ms": -1},
        {"timeout_s": 0},
        {"instances": 0},
    ):
        with pytest.raises(ConfigurationError):
            DynamicBatcher(FakeModel(), **kwargs)


def mlp_bytes(*, batch_dim: str | int = "N", ir_version: int = 10) -> bytes:
    """A 4-8-3 ReLU MLP with fixed random weights, built with onnx.helper."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
            helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [batch_dim]),
        ],
        [
            helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1),
            helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_onnx_model_from_memory_reports_oip_metadata() -> None:
    model = OnnxModel.from_bytes("mlp", mlp_bytes(), version="3", intra_op_threads=1)
    assert model.batchable
    assert model.metadata() == {
        "name": "mlp", "versions": ["3"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }  # fmt: skip
    fixed = OnnxModel.from_bytes("fixed", mlp_bytes(batch_dim=2))
    assert not fixed.batchable
    assert fixed.inputs[0].shape == (2, 4)
    with pytest.raises(ConfigurationError, match="batchable=True"):
        OnnxModel.from_bytes("fixed", mlp_bytes(batch_dim=2), batchable=True)


def test_unloadable_models_raise_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        OnnxModel.from_bytes("junk", b"not an onnx model")
    with pytest.raises(ConfigurationError, match="name"):
        OnnxModel.from_bytes("a/b", mlp_bytes())
    for version in ("", "1/2", "1:2"):  # ':' ends the scale-out queue's model key
        with pytest.raises(ConfigurationError, match="version"):
            OnnxModel.from_bytes("mlp", mlp_bytes(), version=version)
    assert OnnxModel.from_bytes("a:b", mlp_bytes()).name == "a:b"  # names may hold ':'


def test_batched_onnx_results_equal_single_runs() -> None:
    model = OnnxModel.from_bytes("mlp", mlp_bytes(), intra_op_threads=1)
    requests = [
        {"x": np.random.default_rng(i).standard_normal((1 + i % 3, 4)).astype(np.float32)} for i in range(10)
    ]

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=16, max_delay_ms=50)
        results = await gather_all(batcher, requests)
        assert batcher.stats.max_batch_size > 1
        await batcher.close()
        return results

    for request, result in zip(requests, asyncio.run(scenario()), strict=True):
        assert isinstance(result, dict)
        direct = model.run(request)
        np.testing.assert_allclose(result["y"], direct["y"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(result["label"], direct["label"])


def test_repository_versions_and_readiness() -> None:
    repository = ModelRepository(expected=["mlp"])
    assert not repository.ready
    with pytest.raises(ModelNotReadyError):
        repository.get("mlp")
    with pytest.raises(ModelNotFoundError):
        repository.get("other")
    for version in ("2", "10"):
        repository.add(OnnxModel.from_bytes("mlp", mlp_bytes(), version=version, intra_op_threads=1))
    assert repository.ready
    assert repository.get("mlp").version == "10"
    assert repository.get("mlp", "2").version == "2"
    assert repository.versions("mlp") == ["2", "10"]
    with pytest.raises(ModelNotFoundError, match="no version '7'"):
        repository.get("mlp", "7")
    with pytest.raises(ConfigurationError, match="already loaded"):
        repository.add(OnnxModel.from_bytes("mlp", mlp_bytes(), version="2", intra_op_threads=1))


def gather_bytes() -> bytes:
    table = np.arange(10, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], name="secret_lookup")],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("table", TensorProto.FLOAT, [10], table)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def test_input_values_the_model_rejects_fail_alone_as_model_input_errors(
    capfd: pytest.CaptureFixture[str],
) -> None:
    model = OnnxModel.from_bytes("lookup", gather_bytes(), intra_op_threads=1)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=50)
        requests = [{"index": np.array([1, 2])}, {"index": np.array([100])}, {"index": np.array([3])}]
        results = await gather_all(batcher, requests)
        await batcher.close()
        return results

    good, bad, other = asyncio.run(scenario())
    assert isinstance(bad, ModelInputError)
    assert str(bad) == "model 'lookup' rejected the input values"  # no node names, no bounds
    assert isinstance(good, dict)
    assert good["value"].tolist() == [1.0, 2.0]
    assert isinstance(other, dict)
    assert "secret_lookup" not in capfd.readouterr().err  # ORT's own error log stays silent
