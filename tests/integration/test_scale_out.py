"""Scale-out end to end: RA-TLS front end → encrypted Redis Streams → worker processes, with kill -9."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from enclaveml.crypto.keys import KeyHandle
from enclaveml.serving import ModelRepository, OnnxModel
from enclaveml.serving._redis_queue import RedisStreamsQueue
from enclaveml.serving.client import Client
from enclaveml.serving.secure import RunningServer, serve_in_thread
from tests.redis_server import redis_snapshot
from tests.serving_models import digits_model

CLUSTER = KeyHandle.generate("cluster")


def _worker(redis_url: str, instances: int = 1) -> subprocess.Popen[str]:
    env = {**os.environ, "ENCLAVEML_TEST_CLUSTER_KEY": CLUSTER.secret_bytes().hex()}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.serving_worker", redis_url, str(instances)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", process.communicate()[0]
    return process


@pytest.fixture
def front_end(redis_url: str, sim_provider) -> Iterator[RunningServer]:
    repository = ModelRepository([OnnxModel.from_bytes("digits", digits_model()[0], intra_op_threads=1)])
    queue = RedisStreamsQueue(redis_url, cluster_key=CLUSTER, claim_idle_ms=1500)
    running = serve_in_thread(repository, sim_provider, queue=queue, request_timeout_s=60.0)
    yield running
    running.stop()


def test_kill_9_worker_under_load_every_request_answered_once(
    redis_url: str, front_end: RunningServer, sim_verifier, sim_policy
) -> None:
    model_bytes, x_test, _ = digits_model()
    expected = ort.InferenceSession(model_bytes).run(None, {"X": x_test})[0]
    # The one killed runs two batches at once: both batches' entries must be reclaimed.
    workers = [_worker(redis_url, instances=2), _worker(redis_url)]
    answers: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    try:
        with Client(front_end.url, policy=sim_policy, verifier=sim_verifier) as client:

            def one(i: int) -> None:
                row = i % len(x_test)
                label = client.infer("digits", {"X": x_test[row : row + 1]})["label"][0]
                assert label == expected[row]
                with lock:
                    answers[i] += 1

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, i) for i in range(300)]
                # Kill one worker while requests are in flight; its pending entries must be reclaimed.
                futures[60].result(timeout=60)
                workers[0].send_signal(signal.SIGKILL)
                for future in futures:
                    future.result(timeout=120)
        assert len(answers) == 300
        assert set(answers.values()) == {1}
        # Redis held only ciphertext: no input row's bytes appear anywhere in it.
        blob, _ = redis_snapshot(redis_url)
        for row in (0, 1, 2):
            assert x_test[row].tobytes() not in blob
        assert b"digits" not in blob  # even the model name travels encrypted
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
            worker.wait(timeout=30)


def test_front_end_without_workers_times_out_cleanly(
    redis_url: str, sim_provider, sim_verifier, sim_policy
) -> None:
    repository = ModelRepository([OnnxModel.from_bytes("digits", digits_model()[0], intra_op_threads=1)])
    queue = RedisStreamsQueue(redis_url, cluster_key=CLUSTER)
    running = serve_in_thread(repository, sim_provider, queue=queue, request_timeout_s=1.0)
    try:
        with Client(running.url, policy=sim_policy, verifier=sim_verifier) as client:
            from enclaveml.serving.client import InferenceError

            with pytest.raises(InferenceError) as info:
                client.infer("digits", {"X": np.zeros((1, 64), np.float32)})
            assert info.value.status == 504
            assert client.model_metadata("digits")["name"] == "digits"  # the server is still up
    finally:
        running.stop()
