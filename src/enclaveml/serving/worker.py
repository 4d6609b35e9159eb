"""Queue workers: take encrypted requests off the queue, batch them, run the model, reply.

A worker holds the same unsealed models as the front ends (released by the key broker after
attestation) and the cluster key (for the queue's encryption). It runs a
:class:`~enclaveml.serving._batching.DynamicBatcher` per model, so requests that arrive
together from several front ends are batched here just as in the single-process server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from enclaveml.serving._batching import DynamicBatcher, batcher_for
from enclaveml.serving._engine import ModelRepository
from enclaveml.serving._queue import RequestQueue, WorkerStats
from enclaveml.serving._tensor_codec import decode_tensors, encode_tensors
from enclaveml.serving._worker_contract import split_queue_model_key

__all__ = ["QueueWorker"]


@dataclass
class QueueWorker:
    """Serves ``repository`` from ``queue`` until ``stop_event`` is set."""

    repository: ModelRepository
    queue: RequestQueue
    max_batch_size: int = 16
    max_delay_ms: float = 2.0
    max_queue: int = 256
    timeout_s: float = 30.0
    instances: int = 1
    _batchers: dict[str, DynamicBatcher] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        DynamicBatcher.validate(
            self.max_batch_size, self.max_delay_ms, self.max_queue, self.timeout_s, self.instances
        )

    async def handle(self, model_key: str, payload: bytes) -> bytes:
        name, version = split_queue_model_key(model_key)
        model = self.repository.get(name, version)
        batcher = batcher_for(
            self._batchers,
            model,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            timeout_s=self.timeout_s,
            instances=self.instances,
        )
        outputs = await batcher.submit(decode_tensors(payload))
        return b"".join(encode_tensors(outputs))

    async def run(self, stop_event: asyncio.Event) -> WorkerStats:
        """Serve until ``stop_event``; one batch more in flight than run at once, so the next gathers."""
        try:
            return await self.queue.run_worker(
                self.handle, stop_event=stop_event, concurrency=(self.instances + 1) * self.max_batch_size
            )
        finally:
            for batcher in self._batchers.values():
                await batcher.close()
