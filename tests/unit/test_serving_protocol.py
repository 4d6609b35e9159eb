"""OIP request parsing and response encoding: every datatype, both encodings, and the ways requests lie."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from enclaveml.serving._engine import TensorSpec, numpy_dtype
from enclaveml.serving._protocol import (
    InferenceRequest,
    InvalidRequestError,
    RequestedOutput,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
)

INTEGERS = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
NUMERIC = ["BOOL", *INTEGERS, "FP16", "FP32", "FP64"]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = (TensorSpec("Y", "FP32", (-1, 3)), TensorSpec("L", "INT64", (-1,)))
    name: str = "m"
    version: str = "1"


MLP = Signature((TensorSpec("X", "FP32", (-1, 4)),))


def one_input(datatype: str, shape: tuple[int, ...] = (-1, 3)) -> Signature:
    return Signature((TensorSpec("X", datatype, shape),))


def request(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def binary_request(arrays: dict[str, tuple[str, np.ndarray]], **extra: Any) -> tuple[bytes, int]:
    """Build a binary-extension body the way a client would (tritonclient's layout)."""
    inputs, chunks = [], []
    for name, (datatype, array) in arrays.items():
        raw = (
            bytes_elements(array)
            if datatype == "BYTES"
            else array.astype(array.dtype.newbyteorder("<")).tobytes()
        )
        inputs.append({"name": name, "shape": list(array.shape), "datatype": datatype,
                       "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
        chunks.append(raw)
    header = request(inputs, **extra)
    return header + b"".join(chunks), len(header)


def bytes_elements(array: np.ndarray) -> bytes:
    out = b""
    for item in array.ravel():
        raw = item.encode() if isinstance(item, str) else bytes(item)
        out += struct.pack("<I", len(raw)) + raw
    return out


def x(shape: list[int], data: Any, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"name": "X", "shape": shape, "datatype": datatype, "data": data, **extra}


def test_json_nested_and_flat_data_give_the_same_tensor() -> None:
    rows = [[1, 2, 3, 4], [5.5, 6, 7, 8]]
    nested = parse_infer_request(request([x([2, 4], rows)]), MLP)
    flat = parse_infer_request(request([x([2, 4], [v for r in rows for v in r])]), MLP)
    assert nested.inputs["X"].dtype == np.float32
    np.testing.assert_array_equal(nested.inputs["X"], np.array(rows, dtype=np.float32))
    np.testing.assert_array_equal(flat.inputs["X"], nested.inputs["X"])
    assert [o.name for o in nested.outputs] == ["Y", "L"]
    assert not any(o.binary for o in nested.outputs)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_datatype_parses_from_json_and_binary(datatype: str) -> None:
    dtype = numpy_dtype(datatype)
    array = (np.arange(6) % 2).astype(dtype) if datatype == "BOOL" else np.arange(6).astype(dtype)
    array = array.reshape(2, 3)
    from_json = parse_infer_request(request([x([2, 3], array.tolist(), datatype)]), one_input(datatype))
    body, header = binary_request({"X": (datatype, array)})
    from_binary = parse_infer_request(body, one_input(datatype), header_length=header)
    for parsed in (from_json, from_binary):
        assert parsed.inputs["X"].dtype == dtype
        np.testing.assert_array_equal(parsed.inputs["X"], array)


def test_bytes_tensors_from_json_strings_and_binary_elements() -> None:
    model = one_input("BYTES", (-1,))
    parsed = parse_infer_request(request([x([2], ["héllo", ""], "BYTES")]), model)
    assert parsed.inputs["X"].tolist() == ["héllo", ""]
    body, header = binary_request({"X": ("BYTES", np.array(["a", "bc", ""], dtype=object))})
    assert parse_infer_request(body, model, header_length=header).inputs["X"].tolist() == ["a", "bc", ""]


def test_binary_and_json_inputs_mix_in_listed_order() -> None:
    model = Signature(
        (TensorSpec("A", "INT32", (-1,)), TensorSpec("B", "FP64", (-1,)), TensorSpec("C", "UINT8", (2,)))
    )
    a, c = np.array([1, -2, 3], dtype=np.int32), np.array([7, 9], dtype=np.uint8)
    inputs = [
        {"name": "A", "shape": [3], "datatype": "INT32", "parameters": {"binary_data_size": 12}},
        {"name": "B", "shape": [1], "datatype": "FP64", "data": [0.5]},
        {"name": "C", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
    ]
    header = request(inputs)
    parsed = parse_infer_request(header + a.tobytes() + c.tobytes(), model, header_length=len(header))
    np.testing.assert_array_equal(parsed.inputs["A"], a)
    np.testing.assert_array_equal(parsed.inputs["C"], c)
    assert parsed.inputs["B"].tolist() == [0.5]


def test_outputs_selection_binary_flags_id_and_timeout() -> None:
    body = request(
        [x([1, 4], [1, 2, 3, 4])],
        id="req-7",
        parameters={"binary_data_output": True, "timeout": 250_000, "custom": "kept"},
        outputs=[{"name": "L", "parameters": {"binary_data": False}}, {"name": "Y"}],
    )
    parsed = parse_infer_request(body, MLP)
    assert parsed.outputs == (RequestedOutput("L", False), RequestedOutput("Y", True))
    assert parsed.id == "req-7"
    assert parsed.timeout_s == pytest.approx(0.25)
    assert parsed.parameters["custom"] == "kept"


def test_a_huge_timeout_is_cut_not_overflowed() -> None:
    """10**400 microseconds does not fit a float; anything past ~11.6 days means 'the server's limit'."""
    for huge in (10**12, 10**20, 10**400):
        parsed = parse_infer_request(request([x([1, 4], [1, 2, 3, 4])], parameters={"timeout": huge}), MLP)
        assert parsed.timeout_s == pytest.approx(1e6)


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**63], [2**62, 0], [0, 2**31]])
def test_an_empty_tensor_with_a_huge_dim_is_refused_not_reshaped(shape: list[int]) -> None:
    model = one_input("FP32", (-1, -1))
    with pytest.raises(InvalidRequestError, match="integers from 0 to"):
        parse_infer_request(request([x(shape, [])]), model)
    entry = {"name": "X", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": 0}}
    header = request([entry])
    with pytest.raises(InvalidRequestError, match="integers from 0 to"):
        parse_infer_request(header, model, header_length=len(header))
    assert parse_infer_request(request([x([0, 2**31 - 1], [])]), model).inputs["X"].shape == (0, 2**31 - 1)


def test_response_encoding_json_and_binary() -> None:
    results = {"Y": np.array([[0.5, 1.0, 2.0]], dtype=np.float32), "L": np.array([2], dtype=np.int64)}
    plain = encode_infer_response(MLP, InferenceRequest({}, (RequestedOutput("Y", False),), id="a"), results)
    assert plain.header_length is None
    assert plain.content_type == "application/json"
    assert json.loads(plain.body) == {
        "model_name": "m", "model_version": "1", "id": "a",
        "outputs": [{"name": "Y", "datatype": "FP32", "shape": [1, 3], "data": [0.5, 1.0, 2.0]}],
    }  # fmt: skip

    wanted = (RequestedOutput("Y", True), RequestedOutput("L", False))
    mixed = encode_infer_response(MLP, InferenceRequest({}, wanted), results)
    assert mixed.header_length is not None
    assert mixed.content_type == "application/octet-stream"
    document = json.loads(mixed.body[: mixed.header_length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert document["outputs"][1]["data"] == [2]
    y = np.frombuffer(mixed.body[mixed.header_length :], dtype="<f4").reshape(1, 3)
    np.testing.assert_array_equal(y, results["Y"])


def test_bytes_outputs_encode_as_strings_or_length_prefixed_elements() -> None:
    model = Signature(MLP.inputs, (TensorSpec("S", "BYTES", (-1,)),))
    results = {"S": np.array(["ab", "ç"], dtype=object)}
    as_json = encode_infer_response(model, InferenceRequest({}, (RequestedOutput("S", False),)), results)
    assert json.loads(as_json.body)["outputs"][0]["data"] == ["ab", "ç"]
    as_binary = encode_infer_response(model, InferenceRequest({}, (RequestedOutput("S", True),)), results)
    assert as_binary.header_length is not None
    assert as_binary.body[as_binary.header_length :] == bytes_elements(results["S"])


ROW = x([1, 4], [1, 2, 3, 4])
BAD_JSON_REQUESTS: list[tuple[str, bytes, str]] = [
    ("not json", b"{", "not valid JSON"),
    ("not utf-8", b'{"inputs": "\xff"}', "not valid JSON"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("unknown field", request([ROW], inptus=[]), "unknown fields"),
    ("no inputs", request([]), "non-empty list"),
    ("input not an object", request(["X"]), "must be a JSON object"),
    ("unknown input", request([{**ROW, "name": "Z"}]), "unknown input 'Z'"),
    ("duplicate input", request([ROW] * 2), "given twice"),
    ("wrong datatype", request([x([1, 4], [1, 2, 3, 4], "FP64")]), "datatype must be FP32"),
    ("wrong rank", request([x([4], [1, 2, 3, 4])]), "does not fit"),
    ("wrong fixed dim", request([x([1, 5], [1, 2, 3, 4, 5])]), "does not fit"),
    ("negative dim", request([x([-1, 4], [1, 2, 3, 4])]), "integers from 0 to"),
    ("boolean dim", request([x([True, 4], [1, 2, 3, 4])]), "integers from 0 to"),
    ("dim above 2**31 - 1", request([x([2**31, 4], [1, 2, 3, 4])]), "integers from 0 to"),
    ("shape not a list", request([x("1x4", [1, 2, 3, 4])]), "'shape' must be a list"),
    ("too few elements", request([x([2, 4], [1, 2, 3, 4])]), "needs 8 elements, got 4"),
    ("too many elements", request([x([1, 4], [1, 2, 3, 4, 5])]), "needs 4 elements, got 5"),
    ("ragged", request([x([2, 4], [[1, 2, 3, 4], [1, 2]])]), "regular array"),
    ("strings for FP32", request([x([1, 4], ["1", "2", "3", "4"])]), "valid FP32"),
    ("booleans for FP32", request([x([1, 4], [True, False, True, False])]), "valid FP32"),
    ("objects for FP32", request([x([1, 4], [{}, {}, {}, {}])]), "valid FP32"),
    ("huge declared shape", request([x([2**30, 4], [1, 2, 3, 4])]), "declares more data"),
    ("overflowing shape", request([x([2**62, 2**62], [1])]), "integers from 0 to"),
    ("no data", request([{"name": "X", "shape": [1, 4], "datatype": "FP32"}]), "neither 'data'"),
    ("nested parameter", request([{**ROW, "parameters": {"a": {}}}]), "string, number or boolean"),
    ("bad timeout", request([ROW], parameters={"timeout": -1}), "timeout"),
    ("bad binary_data_output", request([ROW], parameters={"binary_data_output": 1}), "boolean"),
    ("unknown output", request([ROW], outputs=[{"name": "Q"}]), "unknown output"),
    ("duplicate output", request([ROW], outputs=[{"name": "Y"}] * 2), "twice"),
    ("classification", request([ROW], outputs=[{"name": "Y", "parameters": {"classification": 2}}]), "class"),
    ("id not a string", request([ROW], id=7), "'id' must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "message"), BAD_JSON_REQUESTS, ids=[c[0] for c in BAD_JSON_REQUESTS]
)
def test_bad_json_requests_are_refused_with_a_precise_message(case: str, body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_infer_request(body, MLP)


def test_integer_data_must_be_integral_and_in_range() -> None:
    for data in ([1.5, 2, 3], [256, 0, 0], [-1, 0, 0], [2**64, 0, 0], [True, False, True]):
        with pytest.raises(InvalidRequestError, match="valid UINT8"):
            parse_infer_request(request([x([1, 3], data, "UINT8")]), one_input("UINT8"))
    with pytest.raises(InvalidRequestError, match="valid BOOL"):
        parse_infer_request(request([x([1, 3], [1, 0, 1], "BOOL")]), one_input("BOOL"))


def binary_case(
    size: int, payload: bytes, *, shape: tuple[int, ...] = (2, 4), data: bool = False
) -> tuple[bytes, int]:
    entry: dict[str, Any] = {"name": "X", "shape": list(shape), "datatype": "FP32",
                             "parameters": {"binary_data_size": size}}  # fmt: skip
    if data:
        entry["data"] = [0] * 8
    header = request([entry])
    return header + payload, len(header)


BAD_BINARY_REQUESTS: list[tuple[str, tuple[bytes, int], str]] = [
    ("size does not match shape", binary_case(16, bytes(16)), "needs 32 bytes"),
    ("huge declared shape", binary_case(32, bytes(32), shape=(2**30, 4)), "needs"),
    ("size beyond body", binary_case(64, bytes(32)), "exceeds the remaining body"),
    ("bytes left over", binary_case(32, bytes(40)), "8 bytes of binary data"),
    ("data and binary", binary_case(32, bytes(32), data=True), "both 'data' and"),
    ("negative size", binary_case(-1, b""), "non-negative integer"),
]


@pytest.mark.parametrize(
    ("case", "body", "message"), BAD_BINARY_REQUESTS, ids=[c[0] for c in BAD_BINARY_REQUESTS]
)
def test_bad_binary_requests_are_refused(case: str, body: tuple[bytes, int], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_infer_request(body[0], MLP, header_length=body[1])


def test_binary_bool_and_bytes_elements_are_checked() -> None:
    header = request(
        [{"name": "X", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}]
    )
    with pytest.raises(InvalidRequestError, match="0 or 1"):
        parse_infer_request(header + b"\x01\x02\x00", one_input("BOOL"), header_length=len(header))
    model = one_input("BYTES", (-1,))
    for payload, message in [
        (struct.pack("<I", 9) + b"abc", "runs past"),
        (struct.pack("<I", 1) + b"\xff", "UTF-8"),
        (struct.pack("<I", 1) + b"ab", "left after"),
        (b"\x01\x00", "cannot hold"),
    ]:
        entry = {
            "name": "X",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(payload)},
        }
        header = request([entry])
        with pytest.raises(InvalidRequestError, match=message):
            parse_infer_request(header + payload, model, header_length=len(header))


def test_inference_header_content_length_is_validated() -> None:
    assert parse_header_length(None, 10) is None
    assert parse_header_length("10", 10) == 10
    # str.isdigit takes the last three: superscripts and ARABIC-INDIC DIGIT ONE, ZERO.
    for value in ("0", "11", "-1", "1e3", "", "9" * 40, "\u00b2", "1\u00b2", "\u0661\u0660"):
        with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length"):
            parse_header_length(value, 10)


def test_a_missing_input_is_named() -> None:
    model = Signature((TensorSpec("A", "FP32", (1,)), TensorSpec("B", "FP32", (1,))))
    with pytest.raises(InvalidRequestError, match=r"also needs inputs \['B'\]"):
        parse_infer_request(request([{"name": "A", "shape": [1], "datatype": "FP32", "data": [1]}]), model)


def test_non_utf8_bytes_output_must_be_requested_as_binary() -> None:
    model = Signature(MLP.inputs, (TensorSpec("S", "BYTES", (-1,)),))
    with pytest.raises(InvalidRequestError, match="binary_data"):
        encode_infer_response(
            model,
            InferenceRequest({}, (RequestedOutput("S", False),)),
            {"S": np.array([b"\xff"], dtype=object)},
        )


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([numpy_dtype(d) for d in NUMERIC]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    )
)
def test_binary_round_trip_of_any_numeric_tensor(array: np.ndarray) -> None:
    datatype = next(d for d in NUMERIC if numpy_dtype(d) == array.dtype)
    model = one_input(datatype, (-1,) * array.ndim)
    body, header = binary_request({"X": (datatype, array)})
    parsed = parse_infer_request(body, model, header_length=header)
    np.testing.assert_array_equal(parsed.inputs["X"], array)
    encoded = encode_infer_response(
        Signature(model.inputs, (TensorSpec("X", datatype, model.inputs[0].shape),)),
        InferenceRequest({}, (RequestedOutput("X", True),)),
        {"X": parsed.inputs["X"]},
    )
    assert encoded.header_length is not None
    assert encoded.body[encoded.header_length :] == body[header:]


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [{"name": "X", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
        b'{"id": "\\udfff", "inputs": [{"name": "X", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
        b'{"parameters": {"p": "\\ud800x"}, "inputs": [{"name": "X", "shape": [1], "datatype": "BYTES", '
        b'"data": ["a"]}]}',
    ],
)
def test_text_utf8_cannot_encode_is_a_bad_request(body: bytes) -> None:
    """JSON escapes let a lone surrogate through; it used to fail later, in ONNX Runtime, as a 500."""
    with pytest.raises(InvalidRequestError, match="valid Unicode"):
        parse_infer_request(body, one_input("BYTES", (-1,)))
