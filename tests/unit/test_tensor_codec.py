"""The queue payload codec: round trips, no copies of tensor data, and malformed payloads refused."""

from __future__ import annotations

import struct

import cbor2
import numpy as np
import pytest

from enclaveml.errors import EnclaveMLError
from enclaveml.serving._tensor_codec import decode_tensors, encode_tensors


def _payload(description: object, data: bytes = b"") -> bytes:
    head = cbor2.dumps(description)
    return struct.pack(">BI", 1, len(head)) + head + data


def test_round_trip_of_every_kind_and_shape() -> None:
    rng = np.random.default_rng(7)
    tensors = {
        "images": rng.standard_normal((2, 3, 4, 5), dtype=np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": np.array([True, False, True]),
        "half": np.ones(3, np.float16),
        "big_endian": np.arange(4, dtype=">i4"),  # travels little-endian, comes back native
        "empty": np.zeros((0, 7), np.float64),
        "scalar": np.float32(2.5),
        "strided": np.arange(20, dtype=np.uint16).reshape(4, 5)[:, ::2],
    }
    decoded = decode_tensors(b"".join(encode_tensors(tensors)))
    assert list(decoded) == list(tensors)
    for name, value in tensors.items():
        got = decoded[name]
        assert got.shape == np.shape(value), name
        assert got.dtype == np.asarray(value).dtype.newbyteorder("="), name
        assert np.array_equal(got, value), name


def test_tensor_data_is_neither_copied_to_encode_nor_to_decode() -> None:
    images = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    head, data = encode_tensors({"images": images})
    assert np.shares_memory(np.frombuffer(data, np.float32), images)
    payload = head + bytes(data)
    decoded = decode_tensors(payload)["images"]
    assert np.shares_memory(decoded, np.frombuffer(payload, np.uint8))
    assert not decoded.flags.writeable  # a view of immutable bytes
    assert np.array_equal(decoded, images)
    # The parts may also arrive joined in a mutable buffer or as a view.
    assert np.array_equal(decode_tensors(memoryview(bytearray(payload)))["images"], images)


def test_text_tensors_round_trip_as_str_object_arrays() -> None:
    """BYTES tensors (ORT's strings): length-prefixed UTF-8, decoded as object arrays of str."""
    tensors = {
        "words": np.array([["a", "naïve"], ["", "x" * 70_000]], dtype=object),
        "unicode_dtype": np.array(["é", "z"]),  # numpy's fixed-width text travels the same way
        "empty": np.empty((0, 3), dtype=object),
        "after": np.arange(3, dtype=np.int32),  # numeric data still follows at the right offset
    }
    payload = b"".join(encode_tensors(tensors))
    decoded = decode_tensors(payload)
    for name, value in tensors.items():
        assert decoded[name].shape == value.shape, name
        assert decoded[name].tolist() == value.tolist(), name
    assert decoded["words"].dtype == object
    assert type(decoded["words"][1, 1]) is str
    # The documented layout: each element a 4-byte little-endian length, then its UTF-8 bytes.
    by_hand = _payload([["t", "str", [2]]], b"\x02\x00\x00\x00\xc3\xa9" + b"\x00\x00\x00\x00")
    assert decode_tensors(by_hand)["t"].tolist() == ["é", ""]
    assert b"".join(encode_tensors({"t": np.array(["é", ""], dtype=object)})) == by_hand


def test_unsupported_dtypes_are_refused_on_encode() -> None:
    with pytest.raises(EnclaveMLError, match="hold str elements, not bytes"):
        encode_tensors({"raw": np.array([b"a", b"b"], dtype=object)})
    with pytest.raises(EnclaveMLError, match="cannot travel"):
        encode_tensors({"c": np.zeros(2, np.complex64)})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"\x01\x00\x00", "too short"),
        (struct.pack(">BI", 1, 100) + b"\xa0", "exceeds the payload"),
        (struct.pack(">BI", 1, 2) + b"\xff\xff", "not valid CBOR"),
        (struct.pack(">BI", 2, 1) + b"\x80", "run front ends and workers of one release"),
        (_payload({"x": ["float32", [1], b"abcd"]}), "must be a list"),
        (_payload([["x", "float32"]]), r"\[name, dtype, shape\]"),
        (_payload([[1, "float32", [1]]], b"abcd"), r"\[name, dtype, shape\]"),
        (_payload([["x", "object", [1]]], b"abcd"), "invalid dtype"),
        (_payload([["x", "float32", 4]], b"abcd"), "invalid dtype or shape"),
        (_payload([["x", "float32", [-1]]], b"abcd"), "invalid shape"),
        (_payload([["x", "float32", [True]]], b"abcd"), "invalid shape"),
        (_payload([["x", "float32", [1] * 33]], b"abcd"), "invalid shape"),
        (_payload([["x", "float32", [2]]], b"abcd"), "exceeds the payload"),
        (_payload([["x", "float32", [2**40, 2**40]]], b"abcd"), "exceeds the payload"),
        (_payload([["x", "float32", [1]]], b"abcde"), "1 bytes follow"),
        (_payload([["x", "uint8", [1]], ["x", "uint8", [1]]], b"ab"), "appears twice"),
        (_payload([["t", "str", [2]]], b"\x01\x00\x00\x00a"), "exceeds the payload"),
        (_payload([["t", "str", [1]]], b"\x05\x00\x00\x00abc"), "exceeds the payload"),
        (_payload([["t", "str", [1]]], b"\x02\x00\x00"), "exceeds the payload"),
        (_payload([["t", "str", [2**40, 2**40]]], b"abcd"), "exceeds the payload"),
        (_payload([["t", "str", [1]]], b"\x01\x00\x00\x00\xff"), "not UTF-8"),
        (_payload([["t", "str", [1]]], b"\x01\x00\x00\x00ab"), "1 bytes follow"),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(EnclaveMLError, match=message):
        decode_tensors(payload)
