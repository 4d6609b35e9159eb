"""An inference worker process for the scale-out tests: ``python -m tests.serving_worker URL [INSTANCES]``.

Serves the digits test model from the Redis request queue until SIGTERM, running up to
``INSTANCES`` batches at once (default 1). The cluster key comes
from ``$ENCLAVEML_TEST_CLUSTER_KEY`` (hex; real workers get it from the key broker).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving import ModelRepository, OnnxModel
from enclaveml.serving._redis_queue import RedisStreamsQueue
from enclaveml.serving.worker import QueueWorker
from tests.serving_models import digits_model


async def main(url: str, instances: int) -> None:
    key = KeyHandle("cluster", 1, bytes.fromhex(os.environ["ENCLAVEML_TEST_CLUSTER_KEY"]))
    repository = ModelRepository([OnnxModel.from_bytes("digits", digits_model()[0], intra_op_threads=1)])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with RedisStreamsQueue(url, cluster_key=key, claim_idle_ms=1500) as queue:
        print("ready", flush=True)
        worker = QueueWorker(repository, queue, max_batch_size=8, max_delay_ms=1.0, instances=instances)
        await worker.run(stop)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
