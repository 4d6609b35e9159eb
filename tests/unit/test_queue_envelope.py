"""The Redis queue's sealed envelope: binding to id, stream and direction; records; key hygiene."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from enclaveml.crypto.keys import KeyHandle
from enclaveml.errors import ConfigurationError, DecryptionError
from enclaveml.serving._queue import QueueDecryptionError
from enclaveml.serving._queue_envelope import (
    REPLY,
    REQUEST,
    QueueCipher,
    ReplyRecord,
    RequestRecord,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_head,
)

STREAM = "enclaveml:requests"
SECRET = b"plaintext model input 12345"


@pytest.fixture
def key() -> KeyHandle:
    return KeyHandle.generate("cluster", 3)


def test_round_trip_and_layout(key: KeyHandle) -> None:
    cipher = QueueCipher(key)
    rid = os.urandom(16)
    envelope = cipher.seal(REQUEST, STREAM, rid, SECRET)
    assert envelope[0] == 1
    assert envelope[1:5] == (3).to_bytes(4, "big")
    assert len(envelope) == 1 + 4 + 12 + len(SECRET) + 16
    assert SECRET not in envelope
    assert cipher.open(REQUEST, STREAM, rid, envelope) == SECRET
    assert QueueCipher(key).open(REQUEST, STREAM, rid, envelope) == SECRET  # same derived key
    assert cipher.seal(REQUEST, STREAM, rid, SECRET)[5:17] != envelope[5:17]  # fresh nonce


@pytest.mark.parametrize(
    "change",
    ["direction", "stream", "rid", "key", "key_version", "tamper", "truncate", "empty"],
)
def test_any_mismatch_is_the_same_typed_error(key: KeyHandle, change: str) -> None:
    cipher = QueueCipher(key)
    rid = os.urandom(16)
    envelope = cipher.seal(REQUEST, STREAM, rid, SECRET)
    direction, stream, opener = REQUEST, STREAM, cipher
    if change == "direction":
        direction = REPLY
    elif change == "stream":
        stream = STREAM + ":reply:00"
    elif change == "rid":
        rid = os.urandom(16)
    elif change == "key":
        opener = QueueCipher(KeyHandle.generate("cluster", 3))
    elif change == "key_version":
        opener = QueueCipher(KeyHandle("cluster", 4, key.secret_bytes()))
    elif change == "tamper":
        envelope = envelope[:-1] + bytes([envelope[-1] ^ 1])
    elif change == "truncate":
        envelope = envelope[:20]
    else:
        envelope = b""
    with pytest.raises(QueueDecryptionError, match=r"^invalid queue envelope$"):
        opener.open(direction, stream, rid, envelope)
    assert issubclass(QueueDecryptionError, DecryptionError)


def test_foreign_key_version_is_recognised(key: KeyHandle) -> None:
    mine = QueueCipher(key)
    other = QueueCipher(KeyHandle.generate("cluster", 9))
    rid = os.urandom(16)
    assert mine.is_foreign_version(other.seal(REQUEST, STREAM, rid, b"x"))
    assert not mine.is_foreign_version(mine.seal(REQUEST, STREAM, rid, b"x"))
    assert not mine.is_foreign_version(b"garbage")


def test_cipher_hides_key_material(key: KeyHandle) -> None:
    cipher = QueueCipher(key)
    assert key.secret_bytes().hex() not in repr(cipher)
    with pytest.raises(TypeError):
        pickle.dumps(cipher)
    with pytest.raises(ConfigurationError):
        QueueCipher(key.secret_bytes())  # type: ignore[arg-type]


def test_request_and_reply_records_round_trip() -> None:
    request = RequestRecord(1_790_000_000_123, bytes(range(16)), "résumé-model", b"\x00payload")
    assert decode_request(encode_request(request)) == request
    assert decode_reply(encode_reply(ReplyRecord(ok=True, body=b"out"))) == ReplyRecord(ok=True, body=b"out")
    error = decode_reply(
        encode_reply(ReplyRecord(ok=False, error_type="ValueError", error_message="x" * 5000))
    )
    assert (error.ok, error.error_type) == (False, "ValueError")
    assert len(error.error_message) < 1024
    for bad in (b"", b"\x07rest"):
        with pytest.raises(QueueDecryptionError):
            decode_reply(bad)
    with pytest.raises(QueueDecryptionError):
        decode_request(encode_request(request)[:10])
    with pytest.raises(ConfigurationError):
        encode_request(RequestRecord(0, b"short", "m", b""))


def test_parts_are_sealed_as_their_concatenation(key: KeyHandle) -> None:
    cipher = QueueCipher(key)
    rid = os.urandom(16)
    array = np.arange(70_000, dtype=np.float32)  # a tensor given as a view of its memory
    parts = [SECRET, bytearray(b"-"), array.data.cast("B"), memoryview(b"tail")[1:], b""]
    joined = b"".join(bytes(part) for part in parts)
    envelope = cipher.seal(REQUEST, STREAM, rid, parts)
    assert len(envelope) == 1 + 4 + 12 + len(joined) + 16
    assert SECRET not in envelope
    assert array.tobytes()[:64] not in envelope
    assert cipher.open(REQUEST, STREAM, rid, envelope) == joined
    assert cipher.open(REQUEST, STREAM, rid, bytes(envelope)) == joined  # as read back from Redis
    assert cipher.open(REQUEST, STREAM, rid, cipher.seal(REQUEST, STREAM, rid, [])) == b""


def test_envelopes_are_written_whole_although_their_buffers_are_not_zeroed(key: KeyHandle) -> None:
    # Large envelopes and opened payloads are filled in place without being zeroed first. Freed
    # buffers of the same size full of a canary come back from the allocator (between the 64 KiB
    # where in-place filling starts and glibc's default 128 KiB mmap threshold); none of it may
    # show through.
    cipher = QueueCipher(key)
    rid = os.urandom(16)
    canary = b"CANARY!!"
    size = 100_000
    record = encode_request(RequestRecord(1_790_000_000_123, os.urandom(16), "m", os.urandom(size)))
    for _ in range(20):
        stale = np.frombuffer(canary * (size // len(canary) + 2), dtype=np.uint8).copy()
        del stale
        envelope = cipher.seal(REQUEST, STREAM, rid, record)
        assert canary not in envelope
        assert cipher.open(REQUEST, STREAM, rid, envelope) == record
        stale = np.frombuffer(canary * (size // len(canary) + 2), dtype=np.uint8).copy()
        del stale
        assert canary not in cipher.open_request(STREAM, rid, envelope).payload


def test_open_request_is_open_then_decode_without_copying_the_payload(key: KeyHandle) -> None:
    cipher = QueueCipher(key)
    rid = os.urandom(16)
    record = RequestRecord(1_790_000_000_123, os.urandom(16), "résumé-model", os.urandom(5000))
    head = request_head(record.deadline_ms, record.frontend_id, record.model)
    assert head + record.payload == encode_request(record)
    envelope = bytes(cipher.seal(REQUEST, STREAM, rid, [head, record.payload]))
    opened = cipher.open_request(STREAM, rid, envelope)
    assert opened == record == decode_request(cipher.open(REQUEST, STREAM, rid, envelope))
    assert type(opened.payload) is bytes  # what handlers are promised
    # Every change of a byte, and every truncation, is the same error; nothing is returned.
    for index in range(len(envelope)):
        changed = bytearray(envelope)
        changed[index] ^= 0x40
        with pytest.raises(QueueDecryptionError, match=r"^invalid queue envelope$"):
            cipher.open_request(STREAM, rid, changed)
    for length in range(0, len(envelope), 97):
        with pytest.raises(QueueDecryptionError, match=r"^invalid queue envelope$"):
            cipher.open_request(STREAM, rid, envelope[:length])
    with pytest.raises(QueueDecryptionError):
        cipher.open_request(STREAM + ":other", rid, envelope)
    with pytest.raises(QueueDecryptionError):  # a sealed record that is not a request
        cipher.open_request(STREAM, rid, cipher.seal(REQUEST, STREAM, rid, b"\x07" + head[1:]))
    with pytest.raises(QueueDecryptionError):  # a sealed reply is not a request
        cipher.open_request(STREAM, rid, cipher.seal(REPLY, STREAM, rid, encode_request(record)))
