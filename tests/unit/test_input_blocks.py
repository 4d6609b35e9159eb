"""The input side of seal_file / unseal_file: mapped regular files, read fallbacks, bounded residency."""

from __future__ import annotations

import io
import mmap
import os
import threading
from pathlib import Path

import pytest

from enclaveml.crypto import _input_blocks
from enclaveml.crypto._input_blocks import input_blocks

KIB = 1 << 10


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(300 * KIB + 123)  # not a multiple of the page or block size
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, data


def _collect(reader: io.FileIO, block_size: int) -> tuple[list[int], bytes]:
    sizes: list[int] = []
    parts: list[bytes] = []
    with input_blocks(reader, block_size) as blocks:
        for block in blocks:
            sizes.append(len(block))
            parts.append(bytes(block))
    return sizes, b"".join(parts)


@pytest.mark.parametrize("start", [0, 1, 4096, 77 * KIB + 5])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_blocks_are_the_rest_of_the_file_in_order(
    data_file: tuple[Path, bytes], start: int, mapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    if not mapped:
        monkeypatch.setattr(_input_blocks, "_map_rest", lambda reader: None)
    with io.FileIO(path, "r") as reader:
        reader.seek(start)
        sizes, got = _collect(reader, 64 * KIB)
        assert reader.tell() == len(data)  # what was yielded counts as read
    assert got == data[start:]
    assert all(size == 64 * KIB for size in sizes[:-1])
    assert 0 < sizes[-1] <= 64 * KIB


def test_regular_files_are_mapped_and_each_view_dies_with_the_next_block(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    with io.FileIO(path, "r") as reader, input_blocks(reader, 100 * KIB) as blocks:
        first = next(blocks)
        assert isinstance(first.obj, mmap.mmap)  # no copy: the cipher reads the page cache
        assert bytes(first[:16]) == data[:16]
        second = next(blocks)
        assert bytes(second[:16]) == data[100 * KIB : 100 * KIB + 16]
        with pytest.raises(ValueError, match="released"):
            first[0]  # a kept view cannot reach unmapped memory
    with pytest.raises(ValueError, match="released"):
        second[0]  # nor after the with block


def test_pipes_and_empty_rests_are_read_and_the_read_buffer_is_zeroed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffers: list[memoryview] = []
    real_read_blocks = _input_blocks._read_blocks

    def spy(reader: io.FileIO, buffer: memoryview):  # type: ignore[no-untyped-def]
        buffers.append(buffer)
        return real_read_blocks(reader, buffer)

    monkeypatch.setattr(_input_blocks, "_read_blocks", spy)
    secret = os.urandom(150 * KIB)
    read_end, write_end = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write_end, secret), os.close(write_end)))
    feeder.start()
    try:
        with io.FileIO(read_end, "r") as reader:
            sizes, got = _collect(reader, 64 * KIB)
    finally:
        feeder.join()
    assert got == secret
    assert sizes[:2] == [64 * KIB, 64 * KIB]
    (tmp_path / "empty").write_bytes(b"")
    with io.FileIO(tmp_path / "empty", "r") as reader:
        assert _collect(reader, 64 * KIB) == ([], b"")
    with io.FileIO(tmp_path / "empty", "r") as reader, input_blocks(reader, 8) as blocks:
        assert list(blocks) == []
    assert len(buffers) == 3
    for buffer in buffers:
        assert buffer.tobytes() == bytes(len(buffer)), "the read buffer held plaintext and was not zeroed"


def test_appended_bytes_are_not_read(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    with io.FileIO(path, "r") as reader, input_blocks(reader, 64 * KIB) as blocks:
        parts = [bytes(next(blocks))]
        with path.open("ab") as appender:
            appender.write(b"appended after open")
        parts.extend(bytes(block) for block in blocks)
    assert b"".join(parts) == data


def test_without_populate_or_mapping_support_it_still_reads_everything(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    monkeypatch.setattr(_input_blocks, "_MADV_POPULATE_READ", 0x7FFF)  # rejected like on an old kernel
    with io.FileIO(path, "r") as reader:
        assert _collect(reader, 64 * KIB)[1] == data

    def no_mmap(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")  # ENODEV: a file system that cannot map files

    monkeypatch.setattr(_input_blocks.mmap, "mmap", no_mmap)
    with io.FileIO(path, "r") as reader:
        assert _collect(reader, 64 * KIB)[1] == data


def test_a_consumer_error_closes_the_mapping(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    kept: list[memoryview] = []

    def consume(reader: io.FileIO) -> None:
        with input_blocks(reader, 64 * KIB) as blocks:
            for block in blocks:
                kept.append(block)
                raise RuntimeError("consumer failed")

    with io.FileIO(path, "r") as reader, pytest.raises(RuntimeError, match="consumer"):
        consume(reader)
    with pytest.raises(ValueError, match="released"):
        kept[0][0]


def test_block_size_must_be_positive(data_file: tuple[Path, bytes]) -> None:
    with (
        io.FileIO(data_file[0], "r") as reader,
        pytest.raises(ValueError, match="positive"),
        input_blocks(reader, 0),
    ):
        pass


def _populate_supported(path: Path) -> bool:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        try:
            mapped.madvise(_input_blocks._MADV_POPULATE_READ, 0, mmap.PAGESIZE)
        except OSError:
            return False
    return True


def test_a_file_truncated_while_mapped_fails_like_a_read_not_with_sigbus(
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    if not _populate_supported(path):
        pytest.skip("MADV_POPULATE_READ needs Linux 5.14")
    with io.FileIO(path, "r") as reader, input_blocks(reader, 64 * KIB) as blocks:
        assert bytes(next(blocks)) == data[: 64 * KIB]
        os.truncate(path, 70 * KIB)  # the next block reaches past the new end
        with pytest.raises(OSError, match="truncated while it was read") as caught:
            next(blocks)
    assert caught.value.errno is not None
