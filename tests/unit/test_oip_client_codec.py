"""The client's decoding of infer responses: exact framing, typed errors (never a bare ValueError)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from enclaveml.errors import EnclaveMLError
from enclaveml.serving._oip_codec import decode_response


def _binary(outputs: list[dict[str, Any]], blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps({"model_name": "m", "outputs": outputs}).encode()
    return head + blobs, str(len(head))


def _out(name: str, shape: list[int], size: int | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": shape, **extra}
    if size is not None:
        item["parameters"] = {"binary_data_size": size}
    return item


def test_json_and_binary_outputs_decode() -> None:
    values = np.arange(4, dtype=np.float32)
    body, length = _binary([_out("y", [2, 2], 16), _out("z", [4], data=[1, 2, 3, 4])], values.tobytes())
    decoded = decode_response(body, length)
    np.testing.assert_array_equal(decoded["y"], values.reshape(2, 2))
    np.testing.assert_array_equal(decoded["z"], [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("outputs", "blobs", "message"),
    [
        ([_out("y", [4], -16)], bytes(16), "declares -16"),
        ([_out("y", [4], 10**9)], bytes(16), "declares 1000000000"),
        ([_out("y", [4], 8)], bytes(8), "needs 16"),
        ([_out("y", [4], 16)], bytes(20), "4 bytes follow the outputs"),
        ([_out("y", [-1], 16)], bytes(16), "bad shape"),
        ([_out("y", [2], data=[1, 2, 3])], b"", "3 values for shape"),
        ([_out("y", [1], data=["x"])], b"", "output 'y'"),
        ([_out("y", [1], 4), _out("y", [1], 4)], bytes(8), "appears twice"),
        ([{"datatype": "FP32", "shape": [1]}], b"", "has no name"),
        (["y"], b"", "not an object"),
    ],
)
def test_inconsistent_responses_are_typed_errors(outputs: list[Any], blobs: bytes, message: str) -> None:
    body, length = _binary(outputs, blobs)
    with pytest.raises(EnclaveMLError, match=message):
        decode_response(body, length)


@pytest.mark.parametrize(
    ("body", "length"), [(b'{"outputs": 3}', None), (b"[]", None), (b"{}", "x"), (b"{}", "9")]
)
def test_malformed_headers_are_typed_errors(body: bytes, length: str | None) -> None:
    with pytest.raises(EnclaveMLError, match="malformed inference response"):
        decode_response(body, length)


def test_the_client_accepts_only_the_outputs_it_asked_for() -> None:
    import httpx

    from enclaveml.serving.client import _result

    body, length = _binary([_out("y", [1], 4), _out("z", [1], 4)], bytes(8))
    answer = httpx.Response(200, content=body, headers={"Inference-Header-Content-Length": length})
    assert set(_result(answer)) == {"y", "z"}  # no selection: every output the model has
    assert set(_result(answer, ["z", "y"])) == {"y", "z"}
    with pytest.raises(EnclaveMLError, match=r"answer a request for \['y'\]"):
        _result(answer, ["y"])


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("FP32", None), ("FP32", ["7.5"]), ("INT64", [1.9, -2.7]), ("BOOL", [5]), ("INT32", [True])],
)
def test_json_values_of_the_wrong_kind_are_refused(datatype: str, data: Any) -> None:
    item = {"name": "y", "datatype": datatype, "shape": [len(data or [0])]}
    if data is not None:
        item["data"] = data
    body, length = _binary([item], b"")
    with pytest.raises(EnclaveMLError, match="output 'y'"):
        decode_response(body, length)
