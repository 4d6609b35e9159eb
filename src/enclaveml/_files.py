"""Files that appear complete or not at all: one implementation for keys, certificates, caches, artifacts.

Why one place: a half-written key, checkpoint or plaintext must never be visible under its
name, and what a crashed process leaves behind should be nothing at all. :func:`atomic_file`
writes to a file with no name (Linux ``O_TMPFILE``: ext4, XFS, btrfs, tmpfs), gives it a
name only when it is complete and renames that onto the target, so ``kill -9`` or a power
cut mid-write leaves no trace: the kernel frees the unnamed file. Where ``O_TMPFILE`` is not
supported (other systems, some network or FUSE file systems, Gramine) it falls back to a
named ``.<name>.*.partial`` sibling that the failure path removes. The mode is set with
``fchmod`` on the open file, so it holds from the first byte whatever the umask.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

__all__ = ["atomic_file", "write_atomically"]

# Errors of open(O_TMPFILE) that mean "not supported here" rather than "cannot write here".
_NO_TMPFILE: Final = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS})


@contextmanager
def atomic_file(dst: Path, *, mode: int = 0o600, durable: bool = False) -> Iterator[int]:
    """Yield a file descriptor open for writing; the file becomes ``dst`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) nothing is left and ``dst`` is untouched.
    With ``durable``, the data and the new directory entry are fsynced before returning. The
    caller must not have writes to the descriptor in flight (threads joined) when the block
    ends, and must not close it. ``OSError`` from the file system propagates.
    """
    fd = _unnamed_file(dst.parent)
    temp_name: str | None = None
    if fd is None:
        fd, temp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    committed = False
    try:
        try:
            os.fchmod(fd, mode)
            yield fd
            if durable:
                os.fsync(fd)
            if temp_name is None:
                temp_name = _name_unnamed_file(fd, dst, durable=durable)
        finally:
            os.close(fd)
        os.replace(temp_name, dst)
        committed = True
        if durable:
            _fsync_directory(dst.parent)
    finally:
        if not committed and temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)


def write_atomically(dst: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` as ``dst`` through :func:`atomic_file` (durable by default: keys, checkpoints)."""
    with atomic_file(dst, mode=mode, durable=durable) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _unnamed_file(directory: Path) -> int | None:
    """An unnamed file in ``directory`` (``O_TMPFILE``), or None where that is not supported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None  # naming it at the end goes through /proc (linkat without CAP_DAC_READ_SEARCH)
    try:
        # Read-write, so that its content can still be copied out if naming it is refused.
        return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise


def _name_unnamed_file(fd: int, dst: Path, *, durable: bool) -> str:
    """Give the complete unnamed file a fresh temporary name beside ``dst`` and return that name.

    ``linkat`` cannot replace an existing file, so the caller renames the new name onto ``dst``.
    Where linking through /proc is refused (some sandboxes), the content is copied by the
    kernel into a named temporary file instead, so the output is never lost.
    """
    # linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW), as open(2) documents; os.link uses linkat
    # (rather than link, which would not follow the magic link) only when given a directory fd.
    try:
        proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for _ in range(100):
                name = os.path.join(dst.parent, f".{dst.name}.{os.urandom(6).hex()}.partial")
                try:
                    os.link(str(fd), name, src_dir_fd=proc_fds, follow_symlinks=True)
                except FileExistsError:
                    continue
                return name
        finally:
            os.close(proc_fds)
    except OSError:
        pass  # refused: copy instead
    return _copy_to_named_file(fd, dst, durable=durable)


def _copy_to_named_file(fd: int, dst: Path, *, durable: bool) -> str:
    copy_fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    try:
        try:
            os.fchmod(copy_fd, os.fstat(fd).st_mode & 0o7777)
            size, offset = os.fstat(fd).st_size, 0
            while offset < size:
                sent = os.sendfile(copy_fd, fd, offset, size - offset)
                if sent == 0:
                    raise OSError(errno.EIO, "the output shrank while it was copied", str(dst))
                offset += sent
            if durable:
                os.fsync(copy_fd)
        finally:
            os.close(copy_fd)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return name


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where directories can be opened and fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that do not support it
        pass
    finally:
        os.close(fd)
