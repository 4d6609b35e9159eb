"""The server processes of ``benchmarks.serving``: ``python -m benchmarks._serving_roles ROLE ...``.

* ``plain``: :func:`enclaveml.serving.create_app` over the model (``--threads`` intra-op threads,
  ``--instances`` batches at once) under uvicorn on 127.0.0.1, no TLS, in-process dynamic
  batching. Prints ``ready http://...``.
* ``secure``: the RA-TLS front end (:func:`enclaveml.serving.secure.serve_in_thread`, simulation
  TEE) in queue mode over the encrypted Redis Streams queue. It loads the model only for its
  signature (one intra-op thread, never run). Prints ``ready https://...``.
* ``worker``: one :class:`enclaveml.serving.QueueWorker` with ``--threads`` intra-op threads and
  ``--instances`` batches at once. Prints ``ready``. ``--worker-concurrency N`` (an experiment,
  not the product's behaviour) serves ``QueueWorker.handle`` with N requests in flight instead
  of ``QueueWorker.run``'s own (one batch more than the instances).

Each keeps the heap memory it frees (:func:`enclaveml._memory.keep_freed_memory`) and settles
its garbage collector once started (:func:`enclaveml._collector.settle_collector`), as ``enclaveml
serve`` and ``serve-worker`` do, serves until SIGTERM, then prints ``stats {json}`` (batch sizes:
rows -> batches) and exits.
The cluster key comes from ``$ENCLAVEML_BENCH_CLUSTER_KEY`` (hex), never the command line; the
simulation key from the file ``--sim-key`` (mode 0600, written by the orchestrator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from enclaveml._collector import settle_collector
from enclaveml._memory import keep_freed_memory
from enclaveml._web import DeadlineHttpProtocol
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider
from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving import ModelRepository, OnnxModel, QueueWorker, RedisStreamsQueue, create_app
from enclaveml.serving.secure import serve_in_thread

__all__ = ["CLUSTER_KEY_ENV", "SIM_CONFIG", "SIM_ENTRY_POINT", "fresh_measurement"]

CLUSTER_KEY_ENV = "ENCLAVEML_BENCH_CLUSTER_KEY"
# The simulated workload; the orchestrator derives the expected measurement from the same values.
SIM_ENTRY_POINT = "benchmarks.serving"
SIM_CONFIG = {"purpose": "serving benchmark"}
REQUEST_TIMEOUT_S = 120.0


def fresh_measurement() -> bytes:
    """The simulated workload's measurement as the servers compute it at start-up.

    It hashes the enclaveml source tree, which others may be editing while this runs, and is
    cached per process; so it is computed in a fresh one, before and after the servers start,
    and both values are allowed (as a deployment allowlists the versions it rolls between).
    """
    code = "import json,sys;from enclaveml.attestation.simulation import workload_measurement as m;"
    code += "print(m(sys.argv[1], json.loads(sys.argv[2])).hex())"
    args = [sys.executable, "-c", code, SIM_ENTRY_POINT, json.dumps(SIM_CONFIG)]
    return bytes.fromhex(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def _model(args: argparse.Namespace, threads: int) -> OnnxModel:
    return OnnxModel.from_bytes(args.name, args.model.read_bytes(), intra_op_threads=threads)


def _cluster_key() -> KeyHandle:
    return KeyHandle("cluster", 1, bytes.fromhex(os.environ[CLUSTER_KEY_ENV]))


def _wait_for_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timeout keeps the main thread responsive to the signal
        pass


def _batch_sizes(batchers: dict[str, Any]) -> dict[str, dict[int, int]]:
    return {key: dict(sorted(b.stats.batch_sizes.items())) for key, b in batchers.items()}


def _plain(args: argparse.Namespace) -> dict[str, Any]:
    model = _model(args, args.threads)
    app = create_app(
        {model.name: model},
        max_batch_size=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        instances=args.instances,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    # The same server settings as enclaveml._web.uvicorn_config, without TLS.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        loop="uvloop",
        http=DeadlineHttpProtocol,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="plain-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the plain server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    settle_collector()
    print(f"ready http://127.0.0.1:{port}", flush=True)
    _wait_for_sigterm()
    server.should_exit = True
    thread.join(30)
    return _batch_sizes(app.state.serving.batchers)


def _secure(args: argparse.Namespace) -> dict[str, Any]:
    provider = SimulationProvider(
        key=SimulationKey.load_or_create(args.sim_key), entry_point=SIM_ENTRY_POINT, config=SIM_CONFIG
    )
    model = _model(args, 1)  # signatures only: the workers run the model
    queue = RedisStreamsQueue(args.redis, cluster_key=_cluster_key())
    running = serve_in_thread(
        {model.name: model},
        provider,
        queue=queue,
        max_batch_size=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    settle_collector()
    print(f"ready {running.url}", flush=True)
    _wait_for_sigterm()
    running.stop(30)
    return {}


async def _serve_queue(args: argparse.Namespace) -> dict[str, Any]:
    repository = ModelRepository([_model(args, args.threads)])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with RedisStreamsQueue(args.redis, cluster_key=_cluster_key()) as queue:
        worker = QueueWorker(
            repository,
            queue,
            max_batch_size=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            timeout_s=REQUEST_TIMEOUT_S,
            instances=args.instances,
        )
        settle_collector()
        print("ready", flush=True)
        if not args.worker_concurrency:
            await worker.run(stop)  # the product: as many requests in flight as one batch holds
        else:  # experiment: more in flight, so that the next batch can gather while one runs
            try:
                await queue.run_worker(worker.handle, stop_event=stop, concurrency=args.worker_concurrency)
            finally:
                for batcher in worker._batchers.values():
                    await batcher.close()
    # QueueWorker has no public accessor for its batchers' counters; this is a diagnostic only.
    return _batch_sizes(worker._batchers)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("role", choices=("plain", "secure", "worker"))
    parser.add_argument("--model", type=Path, required=True, help="the ONNX model file")
    parser.add_argument("--name", required=True, help="the name to serve it under")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--instances", type=int, default=1, help="batches of the model run at once")
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--redis", default="", help="redis:// URL of the request queue")
    parser.add_argument("--sim-key", type=Path, help="simulation TEE key file (secure)")
    parser.add_argument("--worker-concurrency", type=int, default=0, help="0: QueueWorker.run's own")
    args = parser.parse_args()
    # The simulation TEE warns on every start; the orchestrator reports that it is a simulation.
    logging.getLogger("enclaveml.attestation.simulation").setLevel(logging.ERROR)
    keep_freed_memory()  # as enclaveml serve and serve-worker do
    if args.role == "plain":
        stats = _plain(args)
    elif args.role == "secure":
        stats = _secure(args)
    else:
        stats = asyncio.run(_serve_queue(args))
    print("stats " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
