"""Output buffers for whole-artifact sealing and unsealing: a fresh ``bytes`` filled in place, and wiping.

Why not a ``bytearray`` and ``bytes(buf)`` at the end? Consumers such as
``onnxruntime.InferenceSession`` accept only ``bytes``, and converting a 100 MB bytearray
costs a second fresh 100 MB allocation: on a VM the page faults alone take 40-100 ms per
100 MB, as long as decrypting it (measured for benchmarks/sealing.py). So on CPython we do
from Python what C extensions (and ``cryptography`` itself) do: create the ``bytes`` object
uninitialised with ``PyBytes_FromStringAndSize(NULL, n)`` and write into it *before* it is
handed to anyone. The object is new, referenced only by the caller, and not yet hashed, so
this is the documented way to fill it. Where that is not available (another interpreter, or
the self-check below fails), :func:`fresh_bytes` falls back to a bytearray and one copy.

Callers must either fill every byte and then drop the view, or :func:`wipe` it and drop the
object, so no uninitialised memory or partial plaintext escapes.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["FreshBytes", "wipe"]

_ZEROS: Final = bytes(1 << 20)
# Below this size the copy is cheap; the in-place path is used only where it pays.
_IN_PLACE_MIN: Final = 1 << 16


def wipe(view: memoryview) -> None:
    """Overwrite ``view`` with zeros, in blocks, without allocating a buffer of its size."""
    for start in range(0, len(view), len(_ZEROS)):
        end = min(start + len(_ZEROS), len(view))
        view[start:end] = _ZEROS[: end - start]


def _uninitialised_bytes_factory() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """Return a maker of (new bytes object, writable view of its contents), or None if unsafe here."""
    if sys.implementation.name != "cpython":
        return None
    # ob_sval follows the fixed part of PyBytesObject; __basicsize__ counts its trailing NUL.
    offset = bytes.__basicsize__ - 1
    try:
        create = ctypes.pythonapi.PyBytes_FromStringAndSize
        create.restype = ctypes.py_object
        create.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    except AttributeError:  # pragma: no cover - a CPython without its C API exported
        return None

    def make(size: int) -> tuple[bytes, memoryview]:
        obj = create(None, size)
        if type(obj) is not bytes or len(obj) != size:  # pragma: no cover - defensive
            raise MemoryError("could not allocate the output buffer")
        array = (ctypes.c_ubyte * size).from_address(id(obj) + offset)
        return obj, memoryview(array).cast("B")

    # Self-check: writing through the view must change exactly the object's contents.
    pattern = bytes(range(256)) * (_IN_PLACE_MIN // 256)
    try:
        probe, view = make(_IN_PLACE_MIN)
        view[:] = pattern
        view.release()
    except (OSError, TypeError, ValueError, MemoryError):  # pragma: no cover
        return None
    return make if probe == pattern and hash(probe) == hash(pattern) else None


_MAKE_UNINITIALISED: Final = _uninitialised_bytes_factory()


class FreshBytes:
    """A ``bytes`` of a known size under construction: write through :attr:`view`, then :meth:`finish`.

    On any failure call :meth:`discard`, which zeroes what was written.
    """

    __slots__ = ("_buffer", "_done", "_obj", "view")

    def __init__(self, size: int) -> None:
        self._done = False
        self._obj: bytes | None = None
        self._buffer: bytearray | None = None
        if _MAKE_UNINITIALISED is not None and size >= _IN_PLACE_MIN:
            self._obj, self.view = _MAKE_UNINITIALISED(size)
        else:
            self._buffer = bytearray(size)
            self.view = memoryview(self._buffer)

    def finish(self) -> bytes:
        """Return the filled bytes object; the caller has written every byte of :attr:`view`."""
        result = self._obj if self._obj is not None else bytes(self.view)
        self.discard(wipe_first=self._obj is None)
        return result

    def discard(self, *, wipe_first: bool = True) -> None:
        """Zero the contents (unless already handed out) and drop every reference. Idempotent."""
        if self._done:
            return
        self._done = True
        if wipe_first:
            wipe(self.view)
        self.view.release()
        self._obj = None
        self._buffer = None
