"""File plumbing for sealed artifacts: argument checks, bounded reads, and outputs that appear atomically.

Kept apart from :mod:`enclaveml.crypto.sealed` so the format code reads as format code. The
atomic output exists because plaintext must never be left behind half-written: whole-file
unsealing writes to a 0600 file that has no name (``O_TMPFILE``) and names it and renames it
into place only after the final authentication check. On any failure it is dropped (including
KeyboardInterrupt), and a process killed mid-way leaves nothing; where ``O_TMPFILE`` is not
supported, a named temporary sibling is used and deleted on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from enclaveml._files import atomic_file
from enclaveml.crypto._sealed_header import ByteReader
from enclaveml.errors import ConfigurationError

__all__ = [
    "Blob",
    "OutputFile",
    "PathArg",
    "as_blob",
    "atomic_output",
    "check_progress",
    "fill",
    "open_input",
    "output_path",
    "regular_file_size",
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


def regular_file_size(reader: io.FileIO) -> int | None:
    """The size of an opened regular file (after advising sequential reads), or None for anything else."""
    status = os.fstat(reader.fileno())
    if not stat.S_ISREG(status.st_mode):
        return None
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # only a hint (a larger read-ahead window)
            advise(reader.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return status.st_size


def _fallocate_function() -> Callable[[int, int, int], None] | None:
    """Linux ``fallocate(fd, 0, offset, length)``, or None where it is not available.

    Not ``os.posix_fallocate``: where a file system lacks fallocate, glibc emulates it by
    writing a byte into every block, which would double the writes (e.g. on NFSv3). The
    real call fails there instead, and the output is then written without reservation.
    """
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None  # off_t is 64 bits on 64-bit Linux; elsewhere skip the hint rather than guess
    try:
        call = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # pragma: no cover - a libc without fallocate
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    call.restype = ctypes.c_int

    def fallocate(fd: int, offset: int, length: int) -> None:
        if call(fd, 0, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return fallocate


_FALLOCATE: Final = _fallocate_function()
# Reserve disk space this far ahead of the writes, from the thread that writes. On ext4 (and
# XFS) reserving is cheap and makes the writes cheaper: no delayed-allocation bookkeeping per
# page, about 15% less CPU. It is done only on file systems backed by a block device: on tmpfs
# fallocate zero-fills memory pages that the writes then overwrite (sealing ran 25% slower),
# and on network, overlay and copy-on-write file systems (anonymous devices too) its benefit
# is unmeasured.
_RESERVE_STEP: Final = 16 << 20
_OUT_OF_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _on_block_device(fd: int) -> bool:
    """Whether the file lives on a disk file system (ext4, XFS...), not tmpfs, NFS, overlay or btrfs."""
    return os.major(os.fstat(fd).st_dev) != 0


class OutputFile:
    """The temporary output of :func:`atomic_output`: whole-buffer writes with disk space reserved ahead.

    :meth:`write` may run in another thread than the one that called :meth:`expect` (the
    pipeline's writer), but not concurrently with it or with itself.
    """

    __slots__ = ("_fd", "_reserved", "_target", "written")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._reserved = 0
        self._target = 0
        self.written = 0

    def expect(self, size: int) -> None:
        """Say how large the output will probably be, so that :meth:`write` can reserve space ahead.

        Only a hint: if fewer bytes are written, the file is cut back when it is committed.
        """
        if _FALLOCATE is not None and _on_block_device(self._fd):
            self._target = size

    def write(self, data: Blob) -> None:
        """Write all of ``data`` at the current end of the output."""
        view = memoryview(data).cast("B")
        end = self.written + len(view)
        if end > self._reserved and self._reserved < self._target:
            self._reserve(min(self._target, max(end, self._reserved + _RESERVE_STEP)))
        while view:
            count = os.write(self._fd, view)
            self.written += count
            view = view[count:]

    def _reserve(self, limit: int) -> None:
        try:
            if _FALLOCATE is not None:
                _FALLOCATE(self._fd, self._reserved, limit - self._reserved)
        except OSError as exc:
            if exc.errno in _OUT_OF_SPACE:
                raise  # as the write itself would have
            self._target = 0  # not supported here (EOPNOTSUPP, ENODEV, ...): write without it
            return
        self._reserved = limit

    def _trim(self) -> None:
        if self._reserved > self.written:
            os.ftruncate(self._fd, self.written)


@contextmanager
def atomic_output(dst: Path) -> Iterator[OutputFile]:
    """Yield an output file (mode 0600) beside ``dst`` that becomes ``dst`` only if the block succeeds.

    :func:`enclaveml._files.atomic_file`: the output has no name until it is complete where the
    file system supports ``O_TMPFILE`` (a process killed mid-way leaves nothing), else a named
    sibling removed on failure. On any exception ``dst`` is left untouched. The caller must not
    have any write to the file still in flight when the block ends: whoever writes from other
    threads must have joined them first.
    """
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(atomic_file(dst))
        except OSError as exc:
            raise ConfigurationError(f"cannot write to {str(dst.parent)!r}: {exc.strerror or exc}") from exc
        output = OutputFile(fd)
        yield output
        output._trim()
