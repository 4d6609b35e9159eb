"""File plumbing for sealed artifacts: argument checks, bounded reads, and outputs that appear atomically.

Kept apart from :mod:`enclaveml.crypto.sealed` so the format code reads as format code. The
atomic output exists because plaintext must never be left behind half-written: whole-file
unsealing writes to a 0600 temporary sibling and renames it into place only after the final
authentication check, deleting it on any failure (including KeyboardInterrupt).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from enclaveml.crypto._sealed_header import ByteReader
from enclaveml.errors import ConfigurationError

__all__ = [
    "Blob",
    "PathArg",
    "as_blob",
    "atomic_output",
    "check_progress",
    "fill",
    "open_input",
    "output_path",
]

PathArg = str | os.PathLike[str]
Blob = bytes | bytearray | memoryview


def fill(reader: ByteReader, view: memoryview) -> int:
    """Read into ``view`` until it is full or the input ends; return the byte count."""
    filled = 0
    while filled < len(view):
        if isinstance(reader, io.RawIOBase | io.BufferedIOBase):
            count = reader.readinto(view[filled:]) or 0
        else:
            chunk = reader.read(len(view) - filled) or b""
            count = len(chunk)
            view[filled : filled + count] = chunk
        if not count:
            break
        filled += count
    return filled


def as_blob(value: object, what: str) -> memoryview:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ConfigurationError(f"{what} must be bytes, bytearray or memoryview, not {type(value).__name__}")
    return memoryview(value).cast("B")


def check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise ConfigurationError("progress must be a callable taking the number of bytes processed")


def _path(value: object, what: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigurationError(f"{what} must be a file path")
    return Path(value)


def output_path(dst: object) -> Path:
    path = _path(dst, "dst")
    if path.is_dir():
        raise ConfigurationError(f"{str(path)!r} is a directory; name the output file")
    if not path.parent.is_dir():
        raise ConfigurationError(f"the directory of {str(path)!r} does not exist")
    return path


@contextmanager
def open_input(src: object) -> Iterator[io.FileIO]:
    path = _path(src, "src")
    try:
        reader = io.FileIO(path, "r")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    with reader:
        yield reader


@contextmanager
def atomic_output(dst: Path) -> Iterator[Callable[[Blob], None]]:
    """Yield a writer to a 0600 temporary sibling of ``dst``; rename onto ``dst`` only on success."""
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    except OSError as exc:
        raise ConfigurationError(f"cannot write to {str(dst.parent)!r}: {exc.strerror or exc}") from exc
    committed = False
    try:
        with io.FileIO(fd, "w", closefd=True) as out:

            def write(data: Blob) -> None:
                view = memoryview(data)
                while view:
                    view = view[out.write(view) or 0 :]

            yield write
        os.replace(temp_name, dst)
        committed = True
    finally:
        if not committed:
            Path(temp_name).unlink(missing_ok=True)
