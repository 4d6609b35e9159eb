"""The inference server under a real uvicorn (uvloop + httptools) on 127.0.0.1: OIP end to end.

A digits classifier (scikit-learn, converted with skl2onnx) is served; answers are compared with
ONNX Runtime run directly. Clients: httpx (JSON and hand-built binary bodies) and tritonclient.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import json
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from enclaveml._web import start_in_thread
from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.serving import ModelRepository, OnnxModel, create_app

INFER = "/v2/models/digits/infer"
INFER_ROUTE = "/v2/models/{name}/infer"


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, np.ndarray]:
    features, labels = load_digits(return_X_y=True)
    features = features.astype(np.float32)
    classifier = LogisticRegression(max_iter=300).fit(features[:1000], labels[:1000])
    onnx_model = to_onnx(classifier, features[:1], options={"zipmap": False}, target_opset=17)
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    return onnx_model.SerializeToString(), features[1000:]


class SlowModel(OnnxModel):
    """The real model plus a fixed compute time, to create queues on a fast machine."""

    delay_s = 0.0

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return super().run(inputs)


def slow_model(model_bytes: bytes, delay_s: float) -> SlowModel:
    model = SlowModel.from_bytes("digits", model_bytes, intra_op_threads=1)
    assert isinstance(model, SlowModel)
    model.delay_s = delay_s
    return model


@contextlib.contextmanager
def serve(app: FastAPI, **config: object) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on an ephemeral port; yield its base URL."""
    running = start_in_thread(
        uvicorn.Config(app, host="127.0.0.1", port=0, loop="uvloop", http="httptools", log_level="warning",
                       **config),  # type: ignore[arg-type]
        name="test-serve", startup_timeout=15,
    )  # fmt: skip
    try:
        yield running.url
    finally:
        running.stop(15)


def attest(nonce: bytes) -> bytes:
    return b"evidence-for:" + nonce


@pytest.fixture(scope="module")
def server(digits: tuple[bytes, np.ndarray]) -> Iterator[tuple[str, FastAPI, OnnxModel]]:
    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app({"digits": model}, max_request_bytes=64 * 1024, attestation=attest, max_delay_ms=1)
    with serve(app) as url:
        yield url, app, model


@pytest.fixture
def client(server: tuple[str, FastAPI, OnnxModel]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=10) as http:
        yield http


def json_request(rows: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "inputs": [{"name": "X", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}],
        **extra,
    }


def test_metadata_health_and_docs(client: httpx.Client) -> None:
    assert client.get("/v2").json() == {
        "name": "enclaveml",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    metadata = client.get("/v2/models/digits").json()
    assert metadata["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
    assert client.get("/v2/models/digits/versions/1").json() == metadata
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/digits/versions/9").status_code == 404
    assert "/v2/models/{name}/infer" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_json_inference_equals_direct_onnxruntime(
    client: httpx.Client, server: tuple[str, FastAPI, OnnxModel], digits: tuple[bytes, np.ndarray]
) -> None:
    rows = digits[1][:5]
    direct = server[2].run({"X": rows})
    response = client.post(INFER, json=json_request(rows, id="r1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == direct["label"].tolist()
    assert outputs["probabilities"]["shape"] == [5, 10]
    probabilities = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(5, 10)
    np.testing.assert_array_equal(probabilities, direct["probabilities"])


def test_binary_inference_equals_direct_onnxruntime(
    client: httpx.Client, server: tuple[str, FastAPI, OnnxModel], digits: tuple[bytes, np.ndarray]
) -> None:
    rows = digits[1][5:9]
    binary_input = {
        "name": "X",
        "shape": [4, 64],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 1024},
    }
    header = json.dumps({
        "inputs": [binary_input],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}],
    }).encode()  # fmt: skip
    response = client.post(
        INFER, content=header + rows.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    document = json.loads(response.content[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 160}
    probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(4, 10)
    direct = server[2].run({"X": rows})
    np.testing.assert_array_equal(probabilities, direct["probabilities"])
    assert document["outputs"][1]["data"] == direct["label"].tolist()


def test_tritonclient_infers_against_the_server(
    server: tuple[str, FastAPI, OnnxModel], digits: tuple[bytes, np.ndarray]
) -> None:
    rows = digits[1][10:13]
    direct = server[2].run({"X": rows})
    with contextlib.closing(triton.InferenceServerClient(server[0].removeprefix("http://"))) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.get_model_metadata("digits")["name"] == "digits"
        for binary in (True, False):
            inputs = [triton.InferInput("X", list(rows.shape), "FP32")]
            inputs[0].set_data_from_numpy(rows, binary_data=binary)
            result = client.infer("digits", inputs)  # all outputs, binary
            np.testing.assert_array_equal(result.as_numpy("probabilities"), direct["probabilities"])
            np.testing.assert_array_equal(result.as_numpy("label"), direct["label"])
        outputs = [triton.InferRequestedOutput("label", binary_data=False)]
        result = client.infer("digits", inputs, outputs=outputs, request_compression_algorithm="gzip")
        np.testing.assert_array_equal(result.as_numpy("label"), direct["label"])


def tensor(shape: list[int], datatype: str = "FP32", name: str = "X", size: int = 64) -> dict[str, object]:
    return {"json": {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": [0] * size}]}}


BAD_REQUESTS: list[tuple[str, dict[str, object], int]] = [
    ("malformed json", {"content": b'{"inputs": ['}, 400),
    ("wrong shape", tensor([1, 63], size=63), 400),
    ("wrong dtype", tensor([1, 64], "FP64"), 400),
    ("unknown input", tensor([1, 64], name="Z"), 400),
    ("huge declared shape", tensor([2**40, 64], size=1), 400),
    ("bad header length", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}, 400),
    ("superscript header length",  # '²' passes str.isdigit, not int()
     {"content": b"{}", "headers": {"Inference-Header-Content-Length": b"\xb2"}}, 400),
    ("unknown encoding", {"content": b"{}", "headers": {"Content-Encoding": "br"}}, 400),
    ("gzip bomb", {"content": gzip.compress(bytes(10**6)), "headers": {"Content-Encoding": "gzip"}}, 413),
    ("oversized body", {"content": b" " * (65 * 1024)}, 413),
    ("oversized streamed body", {"content": iter([b" " * 8192] * 10)}, 413),
]  # fmt: skip


@pytest.mark.parametrize(("case", "kwargs", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_the_server_stays_up(
    client: httpx.Client,
    server: tuple[str, FastAPI, OnnxModel],
    digits: tuple[bytes, np.ndarray],
    case: str,
    kwargs: dict[str, object],
    status: int,
) -> None:
    stats = server[1].state.stats
    before = stats.status_count(status, INFER_ROUTE)
    response = client.post(INFER, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert (
        stats.status_count(status, INFER_ROUTE) == before + 1
    )  # counted on the route, even if refused early
    assert client.post(INFER, json=json_request(digits[1][:1])).status_code == 200


def test_unknown_model_is_refused_before_the_body_is_read(
    client: httpx.Client, server: tuple[str, FastAPI, OnnxModel]
) -> None:
    stats = server[1].state.stats
    before = stats.request_bytes(INFER_ROUTE)
    response = client.post("/v2/models/nope/infer", content=b'{"inputs": []}')
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'nope'"}
    assert stats.request_bytes(INFER_ROUTE) == before
    assert client.get("/no/such/route").json() == {"error": "Not Found"}


def test_stats_and_metrics_count_requests_and_bytes(
    client: httpx.Client, server: tuple[str, FastAPI, OnnxModel], digits: tuple[bytes, np.ndarray]
) -> None:
    stats = server[1].state.stats
    requests, received, ok = (
        stats.requests(INFER_ROUTE),
        stats.request_bytes(INFER_ROUTE),
        stats.status_count(200),
    )
    body = json.dumps(json_request(digits[1][:2])).encode()
    assert client.post(INFER, content=body).status_code == 200
    assert stats.requests(INFER_ROUTE) == requests + 1
    assert stats.request_bytes(INFER_ROUTE) == received + len(body)
    assert stats.status_count(200) == ok + 1
    metrics = client.get("/metrics").text
    assert 'enclaveml_http_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics
    assert 'enclaveml_batcher_requests_total{model="digits:1",outcome="completed"}' in metrics
    assert "enclaveml_batch_rows_bucket" in metrics


def test_attestation_hook_gets_the_nonce(client: httpx.Client) -> None:
    nonce = bytes(range(32))
    for encoded in (
        nonce.hex(),
        base64.b64encode(nonce).decode(),
        base64.urlsafe_b64encode(nonce).decode().rstrip("="),
    ):
        response = client.get("/attestation", params={"nonce": encoded})
        assert response.status_code == 200
        assert response.content == b"evidence-for:" + nonce
        assert response.headers["cache-control"] == "no-store"
    for bad in ("00" * 15, "00" * 65, "not base64!", ""):
        assert client.get("/attestation", params={"nonce": bad}).status_code == 400
    assert client.get("/attestation").status_code == 400


def test_without_an_attestation_hook_the_endpoint_is_404(digits: tuple[bytes, np.ndarray]) -> None:
    app = create_app({"digits": OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)})
    with serve(app) as url:
        assert httpx.get(f"{url}/attestation", params={"nonce": "00" * 16}).status_code == 404


def test_readiness_waits_for_expected_models(digits: tuple[bytes, np.ndarray]) -> None:
    repository = ModelRepository(expected=["digits"])
    with serve(create_app(repository)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/v2/health/ready").status_code == 503
        assert http.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": False}
        response = http.post(INFER, json=json_request(digits[1][:1]))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        repository.add(OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1))
        assert http.get("/v2/health/ready").status_code == 200
        assert http.post(INFER, json=json_request(digits[1][:1])).status_code == 200


def concurrent_posts(url: str, body: dict[str, object], count: int, workers: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=workers)
    with httpx.Client(base_url=url, timeout=20, limits=limits) as http, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: http.post(INFER, json=body), range(count)))


def test_back_pressure_rejects_with_retry_after_and_nothing_hangs(digits: tuple[bytes, np.ndarray]) -> None:
    app = create_app({"digits": slow_model(digits[0], 0.05)}, max_batch_size=1, max_queue=2)
    with serve(app) as url:
        started = time.monotonic()
        responses = concurrent_posts(url, json_request(digits[1][:1]), count=40, workers=20)
        assert time.monotonic() - started < 15
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected
    assert all(int(r.headers["retry-after"]) >= 1 and "queued" in r.json()["error"] for r in rejected)
    assert app.state.serving.batchers["digits:1"].stats.rejected == len(rejected)


def test_dynamic_batching_merges_concurrent_requests(digits: tuple[bytes, np.ndarray]) -> None:
    model = slow_model(digits[0], 0.02)
    app = create_app({"digits": model}, max_batch_size=8, max_delay_ms=5)
    rows = digits[1][:1]
    with serve(app) as url:
        responses = concurrent_posts(url, json_request(rows), count=48, workers=12)
    assert [r.status_code for r in responses] == [200] * 48
    expected = model.run({"X": rows})["label"].tolist()
    assert all(r.json()["outputs"][0]["data"] == expected for r in responses)
    stats = app.state.serving.batchers["digits:1"].stats
    assert stats.max_batch_size > 1
    assert stats.batches < 48


def test_slow_inference_times_out_with_504(digits: tuple[bytes, np.ndarray]) -> None:
    app = create_app({"digits": slow_model(digits[0], 0.5)}, request_timeout_s=0.1)
    with serve(app) as url:
        response = httpx.post(f"{url}{INFER}", json=json_request(digits[1][:1]), timeout=10)
    assert response.status_code == 504
    assert "did not answer" in response.json()["error"]


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveml-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_the_app_serves_over_tls_with_an_in_memory_key(digits: tuple[bytes, np.ndarray]) -> None:
    certificate_pem, key_pem = self_signed()
    app = create_app({"digits": OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)})
    with (
        in_memory_key_files(certificate_pem, key_pem) as (certfile, keyfile),
        serve(app, ssl_certfile=certfile, ssl_keyfile=keyfile) as url,
    ):
        assert url.startswith("https://")
        response = httpx.post(f"{url}{INFER}", json=json_request(digits[1][:2]), verify=False)
    assert response.status_code == 200
    assert len(response.json()["outputs"][0]["data"]) == 2


def test_attestation_work_is_bounded(digits: tuple[bytes, np.ndarray]) -> None:
    release = threading.Event()

    def slow_attest(nonce: bytes) -> bytes:
        release.wait(10)
        return nonce

    app = create_app(
        {"digits": OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)}, attestation=slow_attest
    )
    with serve(app) as url, ThreadPoolExecutor(8) as pool:
        pending = [
            pool.submit(httpx.get, f"{url}/attestation", params={"nonce": f"{i:032x}"}) for i in range(8)
        ]
        deadline = time.monotonic() + 10
        while app.state.stats.status_count(429, "/attestation") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.serving.attestations_in_flight == 4
        release.set()
        statuses = sorted(f.result().status_code for f in pending)
    assert statuses.count(200) == 4
    assert statuses.count(429) == 4


def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_closed(
    digits: tuple[bytes, np.ndarray],
) -> None:
    """A client sending all but the last bytes of a body, then waiting, must not hold the server."""
    import socket

    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app({"digits": model}, body_timeout_s=0.5)
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b"{" * 100
            )
            started = time.monotonic()
            answer = b""
            while chunk := slow.recv(4096):  # the server closes the connection after answering
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert time.monotonic() - started < 5
        assert app.state.stats.status_count(408) == 1
        with httpx.Client(base_url=url, timeout=10) as http:  # the server is fine
            rows = digits[1][:2]
            assert http.post("/v2/models/digits/infer", json=json_request(rows)).status_code == 200


def test_bodies_in_flight_share_one_budget_and_a_request_past_it_gets_503(
    digits: tuple[bytes, np.ndarray],
) -> None:
    """Many clients sending large bodies at once cannot make the server buffer more than the budget."""
    import socket

    from enclaveml._web import LimitAndCount

    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app(
        {"digits": model}, max_request_bytes=64 * 1024, max_body_bytes_in_flight=160 * 1024, body_timeout_s=10
    )
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    def budget() -> LimitAndCount:
        layer = app.middleware_stack
        while not isinstance(layer, LimitAndCount):
            layer = layer.app  # type: ignore[union-attr]
        return layer

    with serve(app) as url, contextlib.ExitStack() as stack:
        host, port = url.removeprefix("http://").split(":")
        senders = []
        for _ in range(2):  # each sends 60 KiB of a 64 KiB body, then waits
            sender = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
            sender.sendall(head + b"Content-Length: 65536\r\n\r\n" + b" " * 60 * 1024)
            senders.append(sender)
        deadline = time.monotonic() + 5
        while budget().bytes_in_flight < 120 * 1024:
            assert time.monotonic() < deadline, budget().bytes_in_flight
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=10) as http:
            refused = http.post("/v2/models/digits/infer", content=b" " * 50 * 1024,
                                headers={"Content-Type": "application/json"})  # fmt: skip
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            small = http.post("/v2/models/digits/infer", json=json_request(digits[1][:2]))
            assert small.status_code == 200  # a small one still fits beside them
            for sender in senders:
                sender.close()  # the clients give up: their bodies are let go
            deadline = time.monotonic() + 5
            while budget().bytes_in_flight:
                assert time.monotonic() < deadline, budget().bytes_in_flight
                time.sleep(0.01)
            rows = np.repeat(digits[1][:2], 40, axis=0)  # ~40 KiB of JSON
            assert http.post("/v2/models/digits/infer", json=json_request(rows)).status_code == 200
        stats = app.state.stats
        assert stats.status_count(503) == 1
        assert stats.status_count(499) == 2  # gone before their bodies arrived: not server errors
        assert stats.status_count(500) == 0


def test_a_client_that_writes_its_whole_body_before_reading_gets_the_503(
    digits: tuple[bytes, np.ndarray],
) -> None:
    import socket

    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app(
        {"digits": model}, max_request_bytes=1 << 20, max_body_bytes_in_flight=1 << 20, body_timeout_s=10
    )
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as holder:
            holder.sendall(head + b"Content-Length: 1048576\r\n\r\n" + b" " * 600_000)
            time.sleep(0.3)  # 600 000 bytes held; the next body passes the budget part way
            with socket.create_connection((host, int(port)), timeout=10) as writer:
                writer.sendall(head + b"Content-Length: 1000000\r\n\r\n" + b" " * 1_000_000)  # all, then read
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += writer.recv(4096)
                assert answer.startswith(b"HTTP/1.1 503")
                # The connection is still usable: the rest of the refused body was read and dropped.
                writer.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while b"HTTP/1.1 200" not in answer:
                    chunk = writer.recv(4096)
                    assert chunk, answer
                    answer += chunk


def test_a_decompressed_body_counts_against_the_budget(digits: tuple[bytes, np.ndarray]) -> None:
    import socket

    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app(
        {"digits": model}, max_request_bytes=64 * 1024, max_body_bytes_in_flight=64 * 1024, body_timeout_s=10
    )
    rows = np.repeat(digits[1][:1], 150, axis=0)
    plain = json.dumps(json_request(rows)).encode()
    assert 40 * 1024 < len(plain) < 60 * 1024
    packed = gzip.compress(plain)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.post("/v2/models/digits/infer", content=packed, headers=headers).status_code == 200
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as holder:
            holder.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 30000\r\n\r\n" + b" " * 20000
            )
            time.sleep(0.3)  # its 20 000 bytes are in; a small gzip body inflating past the rest is not
            refused = http.post("/v2/models/digits/infer", content=packed, headers=headers)
            assert refused.status_code == 503


def _filler_model() -> bytes:
    """y = zeros(n): a tiny request for an output as large as it asks."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["y"])],
        "filler",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["count"])],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def test_outputs_too_large_for_json_must_be_asked_for_as_binary() -> None:
    model = OnnxModel.from_bytes("filler", _filler_model(), intra_op_threads=1, batchable=False)
    with serve(create_app({"filler": model})) as url, httpx.Client(base_url=url, timeout=60) as http:
        ask = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [3_000_000]}]}
        refused = http.post("/v2/models/filler/infer", json=ask)
        assert refused.status_code == 400
        assert "as binary data" in refused.json()["error"]
        binary = http.post(
            "/v2/models/filler/infer", json={**ask, "parameters": {"binary_data_output": True}}
        )
        assert binary.status_code == 200
        assert len(binary.content) > 3_000_000 * 4
        small = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [10]}]}
        assert http.post("/v2/models/filler/infer", json=small).json()["outputs"][0]["data"] == [0.0] * 10


def test_a_rejected_input_value_reaches_neither_the_log_nor_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ONNX Runtime quotes an out-of-range Gather index in its message: a client's data."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(3, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "i"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[table],
    )
    model_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = OnnxModel.from_bytes("lookup", model_bytes, intra_op_threads=1, batchable=False)
    caplog.set_level("DEBUG")
    with serve(create_app({"lookup": model})) as url, httpx.Client(base_url=url, timeout=30) as http:
        secret = 987654321
        ask = {"inputs": [{"name": "i", "shape": [1], "datatype": "INT64", "data": [secret]}]}
        answer = http.post("/v2/models/lookup/infer", json=ask)
        assert answer.status_code == 400
        assert str(secret) not in answer.text
    assert "rejected its inputs" in caplog.text
    assert str(secret) not in caplog.text


def test_a_slow_body_that_keeps_arriving_is_not_cut_off(digits: tuple[bytes, np.ndarray]) -> None:
    """The deadline is between chunks, not for the whole body: a slow link is not a stalled one."""
    import socket

    model = OnnxModel.from_bytes("digits", digits[0], intra_op_threads=1)
    app = create_app({"digits": model}, body_timeout_s=0.5, min_body_rate=100)
    body = json.dumps(json_request(digits[1][:1])).encode()
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            )
            pieces = [body[i : i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
            for piece in pieces:  # 1.5 s in all, 0.25 s between chunks
                slow.sendall(piece)
                time.sleep(0.25)
            answer = b""
            while chunk := slow.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
