"""Dynamic batching: concurrent requests for one model become one ONNX Runtime call.

:class:`DynamicBatcher` is an asyncio front to a model. Requests wait in a bounded queue; one
worker task takes the oldest request and, if the model has a batch dimension, adds queued requests
whose inputs have the same dtypes and trailing dimensions, until ``max_batch_size`` rows are
gathered or the oldest request has waited ``max_delay_ms``. The batch runs in a dedicated worker
thread (ORT releases the GIL), so the event loop keeps accepting requests, and the results are
split back along dim 0.

``instances`` (Triton's instance count) lets that many batches of one model run at once, each on
its own thread (ORT sessions may be run concurrently); batches are still gathered one at a time,
so the next batch forms while the running ones compute. With ``k`` instances give the model about
``cores / k`` intra-op threads. One instance with every core gives the lowest latency to a lone
request; one single-threaded instance per core gives more throughput where the model shares its
cores with other processes (a queue worker beside its front end and Redis: +3.5%), because ORT
no longer spins at each operator's end for a thread that another process has preempted; a
server alone on its cores gained nothing measurable (docs/benchmarks.md).

Failure containment: a full queue rejects at once with :class:`Overloaded` (never unbounded
memory); a request that times out or is cancelled leaves the queue and is dropped from any batch
not yet started; when a batch fails, its requests are retried one by one so that one bad request
fails alone; :meth:`DynamicBatcher.close` answers every queued request with
:class:`BatcherClosedError` after the running batch finishes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.serving._engine import OnnxModel, ServingError

__all__ = [
    "BatcherClosedError",
    "BatcherStats",
    "BatchingModel",
    "DynamicBatcher",
    "InferenceFailedError",
    "InferenceTimeoutError",
    "Overloaded",
]

_log = logging.getLogger(__name__)


class Overloaded(ServingError):
    """The request queue is full; the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(ServingError):
    """The request was not answered within its timeout; it was dropped from the queue."""


class BatcherClosedError(ServingError):
    """The batcher is shutting down and accepts or finishes no more requests."""


class InferenceFailedError(ServingError):
    """ONNX Runtime failed on a request that passed validation (details are logged, not returned)."""


class BatchingModel(Protocol):
    """What the batcher needs from a model (``OnnxModel`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def batchable(self) -> bool: ...
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class BatcherStats:
    """Counters for tests and metrics; only the event loop thread writes them."""

    submitted: int = 0
    completed: int = 0
    rejected: int = 0
    timed_out: int = 0
    cancelled: int = 0
    failed: int = 0
    batches: int = 0
    rows: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)  # rows -> batches
    queued: int = 0  # waiting now, not yet in a batch

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float


class DynamicBatcher:
    """Batches concurrent requests for one model; see the module docstring for the guarantees."""

    def __init__(
        self,
        model: BatchingModel,
        *,
        max_batch_size: int = 16,
        max_delay_ms: float = 2.0,
        max_queue: int = 256,
        timeout_s: float = 30.0,
        instances: int = 1,
    ) -> None:
        self.validate(max_batch_size, max_delay_ms, max_queue, timeout_s, instances)
        self.model = model
        self.instances = instances
        self.max_batch_size = max_batch_size if model.batchable else 1
        self.max_delay_s = max_delay_ms / 1000
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.stats = BatcherStats()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._gathering: asyncio.Lock | None = None  # one instance gathers at a time
        self._workers: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"ort-{model.name}")
        self._closed = False
        self._batch_seconds = 0.0  # moving average of one batch's run time, for Retry-After

    @staticmethod
    def validate(
        max_batch_size: int, max_delay_ms: float, max_queue: int, timeout_s: float, instances: int = 1
    ) -> None:
        """Raise :class:`ConfigurationError` unless the batching limits make sense."""
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0 or timeout_s <= 0 or instances < 1:
            raise ConfigurationError(
                "DynamicBatcher needs max_batch_size >= 1, max_queue >= 1, max_delay_ms >= 0, timeout_s > 0,"
                " instances >= 1"
            )

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs (each with the request's own dim 0)."""
        if self._closed:
            raise BatcherClosedError("the server is shutting down; retry on another replica")
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(
                f"model {self.model.name!r} has {len(self._queue)} requests queued", self._retry_after()
            )
        self._ensure_worker()
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        item = _Pending(
            inputs, *_batch_key(inputs, self.model.batchable), loop.create_future(), time.monotonic()
        )
        self._queue.append(item)
        self.stats.submitted += 1
        self.stats.queued = len(self._queue)
        self._arrived.set()
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        # A timer that fails the future is cheaper than wait_for + shield on every request.
        timer = loop.call_later(limit, self._expire, item, limit)
        try:
            return await item.future
        except asyncio.CancelledError:
            if item.future.cancelled():  # the caller went away (client disconnect), not a timeout
                self.stats.cancelled += 1
                self._abandon(item)
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        """Stop accepting requests, finish the running batches, fail everything still queued."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the server shut down before this request ran"))
        self.stats.queued = 0
        if self._arrived is not None:
            self._arrived.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _ensure_worker(self) -> None:
        if not self._workers:
            self._arrived = asyncio.Event()
            self._gathering = asyncio.Lock()
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._work(), name=f"batcher-{self.model.name}-{i}")
                for i in range(self.instances)
            ]

    def _expire(self, item: _Pending, limit: float) -> None:
        if item.future.done():
            return
        self.stats.timed_out += 1
        item.future.set_exception(
            InferenceTimeoutError(f"model {self.model.name!r} did not answer within {limit:g} s")
        )
        self._abandon(item)

    def _abandon(self, item: _Pending) -> None:
        if not item.future.done():
            item.future.cancel()
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch
            return
        self.stats.queued = len(self._queue)

    def _retry_after(self) -> float:
        batches_ahead = math.ceil(len(self._queue) / self.max_batch_size)
        return max(1.0, batches_ahead * self._batch_seconds / self.instances)

    async def _work(self) -> None:
        """One instance: take the next batch (one instance at a time), run it, repeat until closed."""
        assert self._gathering is not None
        while not self._closed:
            try:
                async with self._gathering:
                    batch = await self._next_batch()
                if batch:
                    await self._run(batch)
            except Exception:  # noqa: BLE001 - a bug here must not silently stop serving the model
                _log.exception("batcher of model %s hit an unexpected error", self.model.name)

    async def _next_batch(self) -> list[_Pending]:
        """Wait for a request (none once closed), then gather its batch."""
        assert self._arrived is not None
        while not self._queue:
            if self._closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        return await self._gather()

    async def _gather(self) -> list[_Pending]:
        """Take the oldest live request plus compatible ones, waiting at most until its deadline."""
        assert self._arrived is not None
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_delay_s
        while rows < self.max_batch_size and not self._closed:
            for item in list(self._queue):
                if item.key == first.key and rows + item.rows <= self.max_batch_size:
                    self._queue.remove(item)
                    batch.append(item)
                    rows += item.rows
            remaining = deadline - time.monotonic()
            if rows >= self.max_batch_size or remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        self.stats.queued = len(self._queue)
        return [item for item in batch if not item.future.done()]

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            if len(batch) == 1:
                results = [await loop.run_in_executor(self._executor, self.model.run, batch[0].inputs)]
            else:
                results = await loop.run_in_executor(self._executor, self._run_concatenated, batch)
        except Exception as exc:  # noqa: BLE001 - contained: retry alone so only the offending request fails
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            _log.warning("model %s failed on a batch of %d; retrying one by one", self.model.name, len(batch))
            for item in batch:
                if not item.future.done():
                    await self._run([item])
            return
        elapsed = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed if self._batch_seconds else elapsed
        rows = sum(item.rows for item in batch)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.batch_sizes[rows] += 1
        for item, outputs in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(outputs)
                self.stats.completed += 1

    def _fail(self, item: _Pending, exc: Exception) -> None:
        self.stats.failed += 1
        if item.future.done():
            return
        if isinstance(exc, ServingError):  # already typed and safe to show (e.g. ModelInputError)
            item.future.set_exception(exc)
            return
        # Type only: ORT's message names the graph's nodes and shapes, which stay inside the TEE
        # (the engine silences ORT's own log for the same reason).
        _log.error("model %s failed on a request: %s", self.model.name, type(exc).__name__)
        item.future.set_exception(InferenceFailedError(f"model {self.model.name!r} failed on this request"))

    def _run_concatenated(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        """Worker thread: one ORT call over the concatenation, split back by each request's rows."""
        names = batch[0].inputs.keys()
        merged = {n: np.concatenate([item.inputs[n] for item in batch]) for n in names}
        outputs = self.model.run(merged)
        total = sum(item.rows for item in batch)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise ServingError(f"output {name!r} has shape {value.shape}, not {total} rows")
        bounds = np.cumsum([item.rows for item in batch])[:-1]
        split = {n: np.split(v, bounds) for n, v in outputs.items()}
        return [{n: parts[i] for n, parts in split.items()} for i in range(len(batch))]


def _batch_key(inputs: Mapping[str, np.ndarray], batchable: bool) -> tuple[int, tuple[Any, ...]]:
    """(rows, compatibility key): requests concatenate only if names, dtypes and trailing dims agree."""
    if not batchable or not inputs:
        return 1, (object(),)  # a unique key: never merged
    arrays = list(inputs.values())
    rows = arrays[0].shape[0] if arrays[0].ndim else 0
    if any(a.ndim == 0 or a.shape[0] != rows for a in arrays):
        return 1, (object(),)  # inconsistent dim 0: let the model judge it alone
    return rows, tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def batcher_for(
    batchers: dict[str, DynamicBatcher],
    model: OnnxModel,
    *,
    max_batch_size: int,
    max_delay_ms: float,
    max_queue: int,
    timeout_s: float,
    instances: int = 1,
) -> DynamicBatcher:
    """The batcher of ``model`` in ``batchers`` (keyed ``name:version``), created on first use.

    Called inside the event loop that will drive the batcher (the HTTP app, or a queue worker).
    """
    key = f"{model.name}:{model.version}"
    batcher = batchers.get(key)
    if batcher is None:
        batcher = DynamicBatcher(
            model,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            timeout_s=timeout_s,
            instances=instances,
        )
        batchers[key] = batcher
    return batcher
