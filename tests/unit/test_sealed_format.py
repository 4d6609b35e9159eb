"""The sealed-artifact format, byte by byte, and the API's contract around it (examples, not properties).

The layout test decodes an artifact by hand from the documented layout and decrypts it with
the raw primitives, so the documentation and the code cannot drift apart silently.
"""

from __future__ import annotations

import errno
import gc
import io
import itertools
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor

from enclaveml import _files
from enclaveml.crypto import _buffers, _input_blocks, _pipeline, _sealed_io, sealed
from enclaveml.crypto._sealed_header import (
    AUTH_FAILED,
    CHUNK_SIZE,
    MAX_BODY_SIZE,
    MAX_HEADER_SIZE,
    payload_size,
    plaintext_size,
)
from enclaveml.crypto.keys import KeyHandle, KeyRing
from enclaveml.crypto.sealed import (
    read_header,
    seal_bytes,
    seal_file,
    unseal_bytes,
    unseal_file,
    unseal_file_to_bytes,
    unseal_stream,
)
from enclaveml.errors import ConfigurationError, DecryptionError, KeyNotFoundError

KEY = KeyHandle.generate("model-key")


def seal(plaintext: bytes = b"weights", **kwargs: object) -> bytes:
    options: dict[str, object] = {"wrapper": KEY, "key_id": "model-key", **kwargs}
    return seal_bytes(plaintext, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 16383, 16384, 16385, 3 * 16384, 100_000, 1 << 20])
def test_payload_framing_matches_cobblestone(size: int) -> None:
    encryptor = Cobblestone256Encryptor(Cobblestone256Encryptor.generate_key(), b"context")
    produced = len(encryptor.update(bytes(size))) + len(encryptor.finalize())
    assert produced == payload_size(size)
    assert plaintext_size(produced) == size


@pytest.mark.parametrize("payload", [0, 71, 72 + 16384, 72 + 16399, 72 + 16400 + 16384])
def test_impossible_payload_lengths_fail_authentication(payload: int) -> None:
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        plaintext_size(payload)


def test_layout_is_as_documented() -> None:
    plaintext = os.urandom(40_000)
    blob = seal(plaintext, content_type="application/onnx", metadata={"zeta": "z", "alpha": "ä"})
    assert blob[:7] == b"EMLSEAL"
    assert blob[7] == 1
    (body_size,) = struct.unpack(">I", blob[8:12])
    body = blob[12 : 12 + body_size]
    assert body[:2] == b"\x00\x01"  # Cobblestone-256
    assert body[2] == 9
    assert body[3:12] == b"model-key"
    assert body[12] == 16
    assert body[13:29] == b"application/onnx"
    assert body[29:31] == b"\x00\x02"
    assert body[31:] == b"\x05alpha\x00\x02" + "ä".encode() + b"\x04zeta\x00\x01z"  # sorted by name
    end = 12 + body_size
    assert struct.unpack(">I", blob[end : end + 4]) == (1,)
    wrapped_size = blob[end + 4]
    assert wrapped_size == 60
    wrapped = blob[end + 5 : end + 5 + wrapped_size]
    header_size = end + 5 + wrapped_size
    data_key = KEY.unwrap_data_key("model-key", 1, wrapped, blob[:end])  # AAD: header sans version+key
    decryptor = Cobblestone256Decryptor(data_key, blob[:header_size])  # context: the whole header
    assert decryptor.update(blob[header_size:]) + decryptor.finalize() == plaintext
    header = read_header(blob)
    assert header.size == header_size
    assert header.wrapping_aad == blob[:end]


def test_header_limits_are_consistent() -> None:
    assert MAX_BODY_SIZE == 2 + 256 + 256 + 2 + 8192
    assert MAX_HEADER_SIZE == 12 + MAX_BODY_SIZE + 4 + 1 + 255


def test_read_header_needs_no_key_and_accepts_paths_bytes_and_streams(tmp_path: Path) -> None:
    blob = seal(b"x" * 100, content_type="application/onnx", metadata={"model": "resnet50"})
    (tmp_path / "a.sealed").write_bytes(blob)
    stream = io.BytesIO(blob)
    for source in (blob, bytearray(blob), tmp_path / "a.sealed", str(tmp_path / "a.sealed"), stream):
        header = read_header(source)
        assert (header.key_id, header.key_version) == ("model-key", 1)
        assert header.content_type == "application/onnx"
        assert dict(header.metadata) == {"model": "resnet50"}
        assert header.algorithm == "cobblestone-256"
        assert header.format_version == 1
    assert stream.tell() == header.size  # left at the payload
    assert "wrapped" not in repr(header)


def test_metadata_is_canonical_whatever_the_insertion_order() -> None:
    first = read_header(seal(metadata={"b": "2", "a": "1", "c": ""}))
    second = read_header(seal(metadata={"c": "", "a": "1", "b": "2"}))
    assert first.wrapping_aad == second.wrapping_aad
    assert list(first.metadata) == ["a", "b", "c"]
    with pytest.raises(TypeError):
        first.metadata["d"] = "4"  # type: ignore[index]


def _with_body(blob: bytes, body: bytes) -> bytes:
    """Re-encode blob's header with another body (the result fails authentication, if it parses)."""
    (size,) = struct.unpack(">I", blob[8:12])
    return blob[:8] + struct.pack(">I", len(body)) + body + blob[12 + size :]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b"EMLSEAX" + b[7:], "bad magic"),
        (lambda b: b"", "bad magic"),
        (lambda b: b"PK\x03\x04", "bad magic"),
        (lambda b: b[:7] + b"\x02" + b[8:], "unsupported sealed-artifact format version 2"),
        (lambda b: b[:10], "malformed"),
        (lambda b: b[:8] + b"\x00\x01\x00\x00" + b[12:], "body length"),
        (lambda b: _with_body(b, b"\x00\x02" + b[14:43]), "unsupported sealed-artifact algorithm"),
        (lambda b: _with_body(b, b[12:24] + b"\x00" + b[25:43]), "content type length 0"),
        (lambda b: _with_body(b, b[12:14] + b"\x09model\x07key" + b[24:43]), "key id is not valid text"),
        (lambda b: _with_body(b, b[12:41] + b"\x00\x01\x01b\x00\x00\x01a\x00\x00"), "body length does not"),
        (lambda b: _with_body(b, b[12:41] + b"\x00\x02\x01b\x00\x00\x01a\x00\x00"), "not sorted"),
        (lambda b: _with_body(b, b[12:41] + b"\x00\x02\x01a\x00\x00\x01a\x00\x00"), "repeat a name"),
        (lambda b: _with_body(b, b[12:41] + b"\x00\x01\x01 \x00\x00"), "metadata name is not valid"),
    ],
)
def test_malformed_headers_name_only_the_public_field(edit: object, message: str) -> None:
    blob = seal(b"secret plaintext", content_type="application/onnx")
    # The edits rely on these offsets: algorithm at 12, key id 15..24, content type 25..41, count 41.
    assert blob[12:15] == b"\x00\x01\x09"
    assert blob[24] == 16
    assert blob[41:43] == b"\x00\x00"
    broken = edit(blob)  # type: ignore[operator]
    for attempt in (lambda: read_header(broken), lambda: unseal_bytes(broken, unwrapper=KEY)):
        with pytest.raises(DecryptionError, match=message) as caught:
            attempt()
        assert "secret" not in str(caught.value)


def test_wrong_key_and_version_fail_alike_and_a_missing_key_says_which() -> None:
    blob = seal(b"weights")
    other = KeyHandle.generate("model-key")
    v2 = KeyHandle.generate("model-key", version=2)
    messages = set()
    for unwrapper, edit in ((other, blob), (KeyRing(KEY, v2), _set_version(blob, 2))):
        with pytest.raises(DecryptionError) as caught:
            unseal_bytes(edit, unwrapper=unwrapper)
        messages.add(str(caught.value))
    assert messages == {AUTH_FAILED}
    with pytest.raises(KeyNotFoundError, match="version 3"):
        unseal_bytes(_set_version(blob, 3), unwrapper=KeyRing(KEY, v2))
    assert unseal_bytes(seal(b"new", wrapper=KeyRing(KEY, v2)), unwrapper=KeyRing(KEY, v2)) == b"new"


def test_an_unwrappers_own_failure_is_not_reported_as_a_damaged_file(tmp_path: Path) -> None:
    """A broker whose released key did not decrypt is a broker or channel fault, not the file's."""

    class BrokenChannel:
        def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
            raise DecryptionError("the released key could not be decrypted")

    blob = seal(b"weights")
    (tmp_path / "m.sealed").write_bytes(blob)
    for attempt in (
        lambda: unseal_bytes(blob, unwrapper=BrokenChannel()),
        lambda: unseal_file_to_bytes(tmp_path / "m.sealed", unwrapper=BrokenChannel()),
    ):
        with pytest.raises(DecryptionError, match="released key could not be decrypted"):
            attempt()
    damaged = bytearray(blob)
    damaged[blob.index(b"model-key") + 40] ^= 1  # inside the wrapped data key
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        unseal_bytes(bytes(damaged), unwrapper=KEY)


def _set_version(blob: bytes, version: int) -> bytes:
    at = read_header(blob).size - 65
    return blob[:at] + struct.pack(">I", version) + blob[at + 4 :]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key_id": ""},
        {"key_id": "k" * 256},
        {"key_id": "bad\nid"},
        {"key_id": 7},
        {"content_type": ""},
        {"content_type": "application/ø"},
        {"content_type": "a" * 256},
        {"metadata": {"": "x"}},
        {"metadata": {"with space": "x"}},
        {"metadata": {"n" * 65: "x"}},
        {"metadata": {"n": "v" * 1025}},
        {"metadata": {"n": "\x1b[31m"}},
        {"metadata": {"n": 1}},
        {"metadata": {f"n{i}": "" for i in range(65)}},
        {"metadata": {f"n{i:02}": "v" * 1000 for i in range(9)}},
        {"metadata": [("a", "b")]},
        {"wrapper": object()},
    ],
)
def test_bad_seal_arguments_raise_configuration_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        seal(b"x", **kwargs)


def test_limits_at_the_edge_are_accepted() -> None:
    metadata = {f"n{i:02}": "v" * 100 for i in range(64)}
    blob = seal(
        b"x",
        key_id="k" * 255,
        content_type="t" * 255,
        metadata=metadata,
        wrapper=KeyHandle("k" * 255, 1, bytes(32)),
    )
    assert dict(read_header(blob).metadata) == metadata


class _BadWrapper:
    def __init__(self, version: object, wrapped: object) -> None:
        self.result = (version, wrapped)

    def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
        return self.result  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("version", "wrapped"), [(0, b"w"), (2**32, b"w"), ("1", b"w"), (1, b""), (1, b"w" * 256)]
)
def test_a_misbehaving_wrapper_is_a_configuration_error(version: object, wrapped: object) -> None:
    with pytest.raises(ConfigurationError, match="key wrapper returned"):
        seal(wrapper=_BadWrapper(version, wrapped))


def test_bad_unseal_arguments(tmp_path: Path) -> None:
    blob = seal()
    (tmp_path / "s").write_bytes(blob)
    with pytest.raises(ConfigurationError):
        unseal_bytes("text", unwrapper=KEY)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        unseal_bytes(blob, unwrapper=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cannot read"):
        unseal_file(tmp_path / "missing", tmp_path / "o", unwrapper=KEY)
    with pytest.raises(ConfigurationError, match="directory"):
        unseal_file(tmp_path / "s", tmp_path, unwrapper=KEY)
    with pytest.raises(ConfigurationError, match="does not exist"):
        unseal_file(tmp_path / "s", tmp_path / "no" / "o", unwrapper=KEY)
    with pytest.raises(ConfigurationError, match="progress"):
        unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY, progress=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="regular file"):
        unseal_file_to_bytes("/dev/null", unwrapper=KEY)
    with pytest.raises(ConfigurationError):
        read_header(3)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_files_are_private_and_replace_atomically(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"plain" * 1000)
    (tmp_path / "o").write_bytes(b"old")
    header = seal_file(
        tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key", content_type="text/plain"
    )
    assert header == read_header(tmp_path / "s")
    assert unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY) == header
    assert (tmp_path / "o").read_bytes() == b"plain" * 1000
    for name in ("s", "o"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    # Sealing in place works too: the input is read completely before the rename.
    seal_file(tmp_path / "p", tmp_path / "p", wrapper=KEY, key_id="model-key")
    assert unseal_bytes((tmp_path / "p").read_bytes(), unwrapper=KEY) == b"plain" * 1000


def test_failed_unseal_keeps_the_old_output_and_leaves_no_temporary(tmp_path: Path) -> None:
    blob = seal(os.urandom(50_000))
    (tmp_path / "s").write_bytes(blob[:-1])
    (tmp_path / "o").write_bytes(b"old")
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY)
    assert (tmp_path / "o").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "s"]


def test_unseal_file_to_bytes_rejects_bytes_appended_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(seal(b"m" * 70_000) + b"\x00")
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        unseal_file_to_bytes(tmp_path / "s", unwrapper=KEY)


def test_progress_reports_input_bytes_up_to_the_input_size(tmp_path: Path) -> None:
    plaintext = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "p").write_bytes(plaintext)
    seen: list[int] = []
    seal_file(tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key", progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == len(plaintext)
    assert len(seen) == -(-len(plaintext) // sealed._SEAL_FILE_READ)  # once per block
    for call in (
        lambda: unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY, progress=seen.append),
        lambda: unseal_file_to_bytes(tmp_path / "s", unwrapper=KEY, progress=seen.append),
        lambda: b"".join(unseal_stream(tmp_path / "s", unwrapper=KEY, progress=seen.append)),
    ):
        seen.clear()
        call()
        assert seen == sorted(seen)
        assert seen[-1] == (tmp_path / "s").stat().st_size
    (tmp_path / "empty").write_bytes(b"")
    seen.clear()
    seal_file(tmp_path / "empty", tmp_path / "e", wrapper=KEY, key_id="model-key", progress=seen.append)
    assert seen == [0]  # the input's size is the last value, also when it is 0


class _Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most 1000 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        chunk = self._data.read(min(1000, len(buffer)))  # type: ignore[arg-type]
        buffer[: len(chunk)] = chunk  # type: ignore[index]
        return len(chunk)


def test_unseal_stream_yields_a_prefix_before_it_detects_truncation() -> None:
    plaintext = os.urandom(5 * CHUNK_SIZE)
    blob = seal(plaintext)
    assert b"".join(unseal_stream(_Trickle(blob), unwrapper=KEY)) == plaintext
    assert b"".join(unseal_stream(io.BufferedReader(_Trickle(blob)), unwrapper=KEY)) == plaintext
    received = bytearray()

    def consume() -> None:
        for block in unseal_stream(io.BytesIO(blob[:-CHUNK_SIZE]), unwrapper=KEY):
            received.extend(block)

    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        consume()
    assert 0 < len(received) < len(plaintext)
    assert plaintext.startswith(received)


def test_fresh_bytes_are_wiped_when_discarded() -> None:
    for size in (10, 1 << 20):
        buffer = _buffers.FreshBytes(size)
        buffer.view[:] = b"\xaa" * size
        kept = buffer._obj if buffer._obj is not None else buffer._buffer
        buffer.discard()
        buffer.discard()
        assert kept == bytes(size)


def test_failed_unseal_bytes_zeroes_the_plaintext_it_had_decrypted(monkeypatch: pytest.MonkeyPatch) -> None:
    discarded: list[bytes | bytearray | None] = []

    class Spy(_buffers.FreshBytes):
        def discard(self, *, wipe_first: bool = True) -> None:
            discarded.append(self._obj if self._obj is not None else self._buffer)
            super().discard(wipe_first=wipe_first)

    monkeypatch.setattr(sealed, "FreshBytes", Spy)
    blob = seal(b"\xaa" * (5 * CHUNK_SIZE))
    discarded.clear()  # sealing hands its finished buffer out through discard(wipe_first=False)
    # Cut one cipher chunk's worth: the length still looks valid, four chunks decrypt, the last fails.
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        unseal_bytes(blob[: -(CHUNK_SIZE + 16)], unwrapper=KEY)
    assert discarded == [bytes(4 * CHUNK_SIZE)]


def test_fresh_bytes_are_real_bytes() -> None:
    buffer = _buffers.FreshBytes(1 << 20)
    buffer.view[:] = b"ab" * (1 << 19)
    result = buffer.finish()
    assert type(result) is bytes
    assert result == b"ab" * (1 << 19)
    assert hash(result) == hash(b"ab" * (1 << 19))


def test_streaming_memory_stays_bounded(tmp_path: Path) -> None:
    size = 64 << 20
    with (tmp_path / "p").open("wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            out.write(block)
    tracemalloc.start()
    try:
        seal_file(tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key")
        seal_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY)
        unseal_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        in_memory = unseal_file_to_bytes(tmp_path / "s", unwrapper=KEY)
        to_bytes_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Two output buffers of one 4 MiB block each (the input is mapped, not copied): about 8 MiB.
    assert seal_peak < 9 << 20, seal_peak
    assert unseal_peak < 9 << 20, unseal_peak
    assert to_bytes_peak < size + (4 << 20), to_bytes_peak
    assert (tmp_path / "o").stat().st_size == size
    assert len(in_memory) == size
    assert in_memory[-(1 << 20) :] == block


# --- the seal_file / unseal_file pipeline (reader thread -> cipher -> writer thread) ----------

MIB = 1 << 20


def _helper_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("enclaveml-sealed-"))


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """A folder holding p (a plaintext of about ten pipeline blocks), s (it sealed) and o (an old output).

    The file paths' blocks are made 512 KiB here (4 MiB in use), so that ten blocks stay small.
    """
    monkeypatch.setattr(sealed, "_SEAL_FILE_READ", sealed._seal_sizes(32)[0])
    monkeypatch.setattr(sealed, "_SEAL_FILE_OUT", sealed._seal_sizes(32)[1])
    monkeypatch.setattr(sealed, "_UNSEAL_FILE_READ", sealed._unseal_sizes(32)[0])
    monkeypatch.setattr(sealed, "_UNSEAL_FILE_OUT", sealed._unseal_sizes(32)[1])
    plaintext = os.urandom(5 * MIB + 12345)
    (tmp_path / "p").write_bytes(plaintext)
    seal_file(tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key")
    (tmp_path / "o").write_bytes(b"old")
    return tmp_path, plaintext


def _seal(tmp: Path, **kwargs: object) -> object:
    return seal_file(tmp / "p", tmp / "o", wrapper=KEY, key_id="model-key", **kwargs)  # type: ignore[arg-type]


def _unseal(tmp: Path, **kwargs: object) -> object:
    return unseal_file(tmp / "s", tmp / "o", unwrapper=KEY, **kwargs)  # type: ignore[arg-type]


def _assert_clean_failure(tmp: Path) -> None:
    """The old output is untouched, no temporary file is left and no helper thread is running."""
    assert (tmp / "o").read_bytes() == b"old"
    assert sorted(p.name for p in tmp.iterdir()) == ["o", "p", "s"]
    assert _helper_threads() == []


def test_file_paths_write_behind_in_a_writer_thread(files: tuple[Path, bytes]) -> None:
    tmp, plaintext = files
    seen: list[list[str]] = []
    for call in (_seal, _unseal):
        (tmp / "o").write_bytes(b"old")
        call(tmp, progress=lambda done: seen.append(_helper_threads()))
        assert _helper_threads() == []
    assert ["enclaveml-sealed-writer"] in seen
    assert (tmp / "o").read_bytes() == plaintext
    assert unseal_bytes((tmp / "s").read_bytes(), unwrapper=KEY) == plaintext


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("call", [_seal, _unseal])
def test_a_read_error_stops_the_writer_and_propagates(
    files: tuple[Path, bytes], call: object, mapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = files
    threads: list[str] = []

    def count_and_fail() -> None:
        threads.append(threading.current_thread().name)
        if len(threads) == 3:
            raise OSError(errno.EIO, "injected read error")

    if mapped:
        real_iter = _input_blocks._MappedBlocks.__iter__

        def failing_iter(self: _input_blocks._MappedBlocks) -> Iterator[memoryview]:
            for block in real_iter(self):
                count_and_fail()
                yield block

        monkeypatch.setattr(_input_blocks._MappedBlocks, "__iter__", failing_iter)
    else:
        real_fill = _sealed_io.fill

        def failing_fill(reader: object, view: memoryview) -> int:
            count_and_fail()
            return real_fill(reader, view)  # type: ignore[arg-type]

        monkeypatch.setattr(_input_blocks, "_map_rest", lambda reader: None)
        monkeypatch.setattr(_input_blocks, "fill", failing_fill)
    with pytest.raises(OSError, match="injected read error") as caught:
        call(tmp)  # type: ignore[operator]
    assert caught.value.errno == errno.EIO
    assert set(threads) == {threading.current_thread().name}  # reads stay in the calling thread
    _assert_clean_failure(tmp)


@pytest.mark.parametrize("call", [_seal, _unseal])
def test_a_write_error_in_the_writer_thread_propagates(
    files: tuple[Path, bytes], call: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = files
    real_write = _sealed_io.OutputFile.write
    threads: list[str] = []

    def failing_write(self: _sealed_io.OutputFile, data: memoryview) -> None:
        threads.append(threading.current_thread().name)
        if len(threads) == 4:
            raise OSError(errno.ENOSPC, "injected: no space left")
        real_write(self, data)

    monkeypatch.setattr(_sealed_io.OutputFile, "write", failing_write)
    with pytest.raises(OSError, match="injected") as caught:
        call(tmp)  # type: ignore[operator]
    assert caught.value.errno == errno.ENOSPC
    assert set(threads) == {"enclaveml-sealed-writer"}
    _assert_clean_failure(tmp)


@pytest.mark.parametrize("call", [_seal, _unseal])
@pytest.mark.parametrize("error", [RuntimeError("progress failed"), KeyboardInterrupt()])
def test_an_error_in_the_calling_thread_stops_the_helpers(
    files: tuple[Path, bytes], call: object, error: BaseException
) -> None:
    tmp, _ = files

    def progress(done: int) -> None:
        if done > 2 * MIB:
            raise error

    with pytest.raises(type(error)) as caught:
        call(tmp, progress=progress)  # type: ignore[operator]
    assert caught.value is error
    _assert_clean_failure(tmp)


@pytest.mark.parametrize("call", [_seal, _unseal])
@pytest.mark.parametrize("fail", [False, True])
def test_every_pipeline_buffer_is_zeroed_afterwards(
    files: tuple[Path, bytes], call: object, fail: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = files
    pipelines: list[_pipeline.BlockPipeline] = []

    class Spy(_pipeline.BlockPipeline):
        def __enter__(self) -> _pipeline.BlockPipeline:
            pipelines.append(self)
            return super().__enter__()

    def progress(done: int) -> None:
        if fail and done > 2 * MIB:
            raise RuntimeError("stop")

    monkeypatch.setattr(sealed, "BlockPipeline", Spy)
    if fail:
        with pytest.raises(RuntimeError, match="stop"):
            call(tmp, progress=progress)  # type: ignore[operator]
    else:
        call(tmp, progress=progress)  # type: ignore[operator]
    [pipe] = pipelines
    for view in pipe._out_pool:
        assert view.tobytes() == bytes(len(view)), "a buffer that held plaintext was not zeroed"


def test_damage_in_the_middle_of_a_large_file_fails_unseal_file_cleanly(files: tuple[Path, bytes]) -> None:
    tmp, _ = files
    blob = bytearray((tmp / "s").read_bytes())
    blob[len(blob) // 2] ^= 1
    (tmp / "s").write_bytes(blob)
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        _unseal(tmp)
    _assert_clean_failure(tmp)


def test_unseal_file_renames_only_after_the_last_chunk_verified_and_was_written(
    files: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, plaintext = files
    events: list[str] = []
    real_final, real_replace = sealed._final, os.replace

    def final(decryptor: object) -> bytes:
        tail = real_final(decryptor)  # type: ignore[arg-type]
        events.append("verified")
        return tail

    def replace(src: str, dst: Path) -> None:
        events.append("rename")
        assert Path(src).read_bytes() == plaintext  # complete: the writer thread had finished
        assert _helper_threads() == []
        real_replace(src, dst)

    monkeypatch.setattr(sealed, "_final", final)
    monkeypatch.setattr(os, "replace", replace)
    _unseal(tmp)
    assert events == ["verified", "rename"]
    assert (tmp / "o").read_bytes() == plaintext


def test_inputs_that_are_not_regular_files_work(tmp_path: Path) -> None:
    plaintext = os.urandom(3 * MIB + 7)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    seen: list[list[str]] = []

    def record(done: int) -> None:
        seen.append(_helper_threads())

    def through_fifo(data: bytes, call: Callable[[], object]) -> None:
        feeder = threading.Thread(target=fifo.write_bytes, args=(data,))
        feeder.start()
        try:
            call()
        finally:
            feeder.join()

    sealing = {"wrapper": KEY, "key_id": "model-key", "progress": record}
    through_fifo(plaintext, lambda: seal_file(fifo, tmp_path / "s", **sealing))  # type: ignore[arg-type]
    through_fifo((tmp_path / "s").read_bytes(), lambda: unseal_file(fifo, tmp_path / "o", unwrapper=KEY))
    assert (tmp_path / "o").read_bytes() == plaintext
    assert len(seen) == -(-len(plaintext) // sealed._SEAL_FILE_READ)
    assert _helper_threads() == []


def test_disk_space_is_reserved_ahead_and_trimmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _sealed_io._FALLOCATE
    if real is None:
        pytest.skip("no fallocate on this platform")
    calls: list[tuple[int, int]] = []

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(_sealed_io, "_FALLOCATE", spy)
    monkeypatch.setattr(_sealed_io, "_on_block_device", lambda fd: True)  # even where /tmp is a tmpfs
    plaintext = os.urandom(40 * MIB + 3)
    (tmp_path / "p").write_bytes(plaintext)
    header = seal_file(tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key")
    size = header.size + payload_size(len(plaintext))
    assert (tmp_path / "s").stat().st_size == size
    assert calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))  # contiguous, in steps
    assert calls[-1][0] + calls[-1][1] == size
    calls.clear()
    unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY)
    assert calls[-1][0] + calls[-1][1] == len(plaintext)
    assert (tmp_path / "o").read_bytes() == plaintext
    # A hint larger than what is written is cut back.
    with _sealed_io.atomic_output(tmp_path / "short") as output:
        output.expect(10 * MIB)
        output.write(b"x" * 1000)
    assert (tmp_path / "short").read_bytes() == b"x" * 1000


def test_no_space_is_reserved_off_block_devices(
    files: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On tmpfs, fallocate would zero-fill memory pages that the writes then overwrite."""
    tmp, plaintext = files
    calls: list[int] = []
    monkeypatch.setattr(_sealed_io, "_FALLOCATE", lambda fd, offset, length: calls.append(offset))
    monkeypatch.setattr(_sealed_io, "_on_block_device", lambda fd: False)
    _seal(tmp)
    _unseal(tmp)
    assert calls == []
    assert (tmp / "o").read_bytes() == plaintext
    if Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tmp).st_dev:
        fd = os.open("/dev/shm", os.O_RDONLY)
        try:
            assert not _sealed_io._on_block_device(fd)  # a tmpfs has an anonymous device
        finally:
            os.close(fd)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_running_out_of_space_while_reserving_fails_like_a_write(
    files: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    tmp, _ = files

    def fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_sealed_io, "_FALLOCATE", fallocate)
    monkeypatch.setattr(_sealed_io, "_on_block_device", lambda fd: True)
    for call in (_seal, _unseal):
        with pytest.raises(OSError, match=os.strerror(code)) as caught:
            call(tmp)
        assert caught.value.errno == code
        _assert_clean_failure(tmp)


def test_file_systems_without_fallocate_are_written_without_reservation(
    files: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, plaintext = files
    calls: list[int] = []

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(_sealed_io, "_FALLOCATE", fallocate)
    monkeypatch.setattr(_sealed_io, "_on_block_device", lambda fd: True)
    _unseal(tmp)
    assert (tmp / "o").read_bytes() == plaintext
    assert calls == [0]  # tried once, then not again


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_streaming_rss_stays_bounded(tmp_path: Path) -> None:
    """tracemalloc sees the pools, not what C code allocates in threads: check the process's peak RSS too."""
    if not _rss_peak_reset():
        pytest.skip("/proc/self/clear_refs is not available")
    size = 256 * MIB
    with (tmp_path / "p").open("wb") as sparse:  # reads as zeros, costs no disk space
        sparse.truncate(size)
    growth: dict[str, int] = {}
    calls: dict[str, Callable[[], object]] = {
        "seal": lambda: seal_file(tmp_path / "p", tmp_path / "s", wrapper=KEY, key_id="model-key"),
        "unseal": lambda: unseal_file(tmp_path / "s", tmp_path / "o", unwrapper=KEY),
    }
    for name, call in calls.items():
        gc.collect()
        assert _rss_peak_reset()
        before = _rss_kib("VmRSS")
        call()
        growth[name] = _rss_kib("VmHWM") - before
    assert (tmp_path / "o").stat().st_size == size
    assert max(growth.values()) < 32 * 1024, growth  # KiB: the buffers take about 2 MiB


# --- the output has no name until it is complete ---------------------------------------------


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _o_tmpfile_works(folder: Path) -> bool:
    fd = _files._unnamed_file(folder)
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("call", [_seal, _unseal])
def test_the_output_has_no_name_until_it_is_complete(files: tuple[Path, bytes], call: object) -> None:
    tmp, plaintext = files
    if not _o_tmpfile_works(tmp):
        pytest.skip("no O_TMPFILE here")
    seen: list[list[str]] = []
    call(tmp, progress=lambda done: seen.append(_entries(tmp)))  # type: ignore[operator]
    assert len(seen) > 3
    assert all(entries == ["o", "p", "s"] for entries in seen), seen  # no partial file, old o kept
    assert _entries(tmp) == ["o", "p", "s"]
    if call is _unseal:
        assert (tmp / "o").read_bytes() == plaintext
    assert (tmp / "o").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("call", [_seal, _unseal])
def test_without_o_tmpfile_a_named_partial_file_is_used_and_removed_on_failure(
    files: tuple[Path, bytes], call: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = files
    monkeypatch.setattr(_files, "_unnamed_file", lambda directory: None)
    seen: list[list[str]] = []

    def progress(done: int) -> None:
        seen.append(_entries(tmp))
        if len(seen) == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        call(tmp, progress=progress)  # type: ignore[operator]
    assert any(name.startswith(".o.") and name.endswith(".partial") for name in seen[-1])
    _assert_clean_failure(tmp)
    call(tmp)  # type: ignore[operator]
    assert _entries(tmp) == ["o", "p", "s"]


_KILLED_UNSEAL = """
import os, sys, time
from enclaveml.crypto.keys import KeyHandle
from enclaveml.crypto.sealed import unseal_file
key = KeyHandle("model-key", 1, bytes.fromhex(sys.argv[3]))
def progress(done):
    if done > 8 << 20:
        print("half way", flush=True)
        time.sleep(60)
unseal_file(sys.argv[1], sys.argv[2], unwrapper=key, progress=progress)
"""


def test_a_killed_unseal_leaves_no_plaintext_behind(tmp_path: Path) -> None:
    """kill -9 cannot be cleaned up after: the unnamed output dies with the process."""
    if not _o_tmpfile_works(tmp_path):
        pytest.skip("no O_TMPFILE here")
    secret = os.urandom(32)
    canary = b"CANARY-PLAINTEXT-" * (1 << 16)  # about 1 MiB, repeated 24 times below
    (tmp_path / "p").write_bytes(canary * 24)
    seal_file(tmp_path / "p", tmp_path / "s", wrapper=KeyHandle("model-key", 1, secret), key_id="model-key")
    (tmp_path / "p").unlink()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_UNSEAL, str(tmp_path / "s"), str(tmp_path / "o"), secret.hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "half way\n"  # plaintext has been written by now
        child.kill()
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert _entries(tmp_path) == ["s"]


@pytest.mark.parametrize("call", [_seal, _unseal, "to_bytes"])
def test_an_input_truncated_mid_read_fails_cleanly(files: tuple[Path, bytes], call: object) -> None:
    tmp, _ = files
    source = tmp / ("p" if call is _seal else "s")
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        try:
            mapped.madvise(_input_blocks._MADV_POPULATE_READ, 0, mmap.PAGESIZE)
        except OSError:
            pytest.skip("MADV_POPULATE_READ needs Linux 5.14")

    def progress(done: int) -> None:
        if done > 2 * MIB:
            os.truncate(source, MIB)

    def run() -> object:
        if call == "to_bytes":
            return unseal_file_to_bytes(source, unwrapper=KEY, progress=progress)
        return call(tmp, progress=progress)  # type: ignore[operator]

    with pytest.raises(OSError, match="truncated while it was read"):
        run()
    _assert_clean_failure(tmp)  # no output, the old one untouched, no thread left


def test_a_host_inflated_file_is_refused_without_committing_its_declared_size(tmp_path: Path) -> None:
    """Zeros appended to a real artifact (a sparse 4 GiB file): the output buffer is sized from the
    file before the end is authenticated, so a failure must wipe only what was written; wiping the
    whole buffer would commit gigabytes of memory. Run in a child to read its peak RSS cleanly."""
    path = tmp_path / "inflated.sealed"
    path.write_bytes(seal(b"weights" * 1000))
    with open(path, "r+b") as f:
        f.truncate(4 * 2**30)
    code = (
        "import resource, sys\n"
        "from enclaveml.crypto.keys import KeyHandle\n"
        "from enclaveml.crypto.sealed import unseal_file_to_bytes\n"
        "from enclaveml.errors import CryptoError\n"
        f"key = KeyHandle('model-key', 1, bytes.fromhex('{KEY.secret_bytes().hex()}'))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    unseal_file_to_bytes({str(path)!r}, unwrapper=key)\n"
        "except CryptoError as exc:\n"
        "    print(type(exc).__name__, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    kind, before_kib, peak_kib = result.stdout.split()
    assert kind in ("DecryptionError", "CryptoError"), result.stderr
    grew_mib = (int(peak_kib) - int(before_kib)) // 1024
    assert grew_mib < 256, f"peak RSS grew by {grew_mib} MiB while unsealing"
