"""A bounded block pipeline for the streaming file paths: reader thread -> caller -> writer thread.

Why: sealing a page-cached file is three steps of similar cost per block, reading (a kernel
copy out of the page cache), the cipher, and writing (a kernel copy into fresh page-cache
pages). Run one after another they add up; here the reads and writes run in two helper
threads while the calling thread runs the cipher, so the slowest step sets the pace. ``read``
and ``write`` release the GIL in the kernel, and so does ``update_into`` of
``cryptography.cobblestone`` (a Python thread keeps running during a long call), so the
three overlap.

Shape and guarantees:

* A fixed pool of ``depth`` input buffers and ``depth`` output buffers is allocated up front
  (plain ``bytearray``\\ s, so tracemalloc sees them) and reused: no per-block allocation, and
  memory is bounded by ``depth * (read_size + out_size)`` whatever the file size.
* Blocks come out of :meth:`BlockPipeline.blocks` in file order and are written in the order
  they were sent; the caller does all the cipher work and calls any progress callback itself.
* An exception in a helper thread is re-raised, as the same object, in the calling thread at
  its next interaction with the pipeline (or on leaving the ``with`` block). An exception in
  the calling thread cancels the helpers. Either way both helpers have been joined before the
  ``with`` block is left (a KeyboardInterrupt during the join is held back until they have),
  and both pools are zeroed, because one of them held plaintext.
* ``threaded=False`` runs the same interface inline in the calling thread. It is used for
  sources that are not regular files (pipes, character devices), whose reads can block for
  ever: a helper thread stuck in such a read could not be joined.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

from enclaveml.crypto._buffers import wipe
from enclaveml.crypto._sealed_header import ByteReader
from enclaveml.crypto._sealed_io import Blob, fill

__all__ = ["BlockPipeline"]


class _Stop:
    """Queue sentinel: the receiving thread returns."""


class _Failure:
    """Queue item carrying a helper thread's exception to the calling thread."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_STOP: Final = _Stop()
_InItem = tuple[memoryview, int] | _Failure
_OutItem = tuple[memoryview, memoryview | None] | _Stop


class BlockPipeline:
    """Read ``source`` in blocks of ``read_size`` bytes and write what the caller sends to ``sink``.

    Use as a context manager::

        with BlockPipeline(reader, output.write, read_size=..., out_size=...) as pipe:
            pipe.send_bytes(header)
            for block in pipe.blocks():                  # valid until the next block is requested
                out = pipe.output()                      # a free output buffer of out_size bytes
                pipe.send(out, cipher.update_into(block, out))
            pipe.send_bytes(cipher.finalize())
        # here every byte sent has been passed to sink, or an exception is propagating

    ``sink`` must write all of the view it is given (or raise). It runs in the writer thread;
    ``fill(source, ...)`` runs in the reader thread. The caller must not touch ``source``
    until the ``with`` block is left.
    """

    def __init__(
        self,
        source: ByteReader,
        sink: Callable[[memoryview], object],
        *,
        read_size: int,
        out_size: int,
        depth: int = 2,
        threaded: bool = True,
    ) -> None:
        if read_size < 1 or out_size < 1 or depth < 1:
            raise ValueError("read_size, out_size and depth must be positive")
        self._source, self._sink, self._threaded = source, sink, threaded
        self._in_pool = [memoryview(bytearray(read_size)) for _ in range(depth if threaded else 1)]
        self._out_pool = [memoryview(bytearray(out_size)) for _ in range(depth if threaded else 1)]
        self._free_in: queue.SimpleQueue[memoryview | _Stop] = queue.SimpleQueue()
        self._filled: queue.SimpleQueue[_InItem] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[_OutItem] = queue.SimpleQueue()
        self._free_out: queue.SimpleQueue[memoryview | _Failure] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._write_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        for buffer in self._in_pool:
            self._free_in.put(buffer)
        for buffer in self._out_pool:
            self._free_out.put(buffer)

    # --- the calling thread's side ----------------------------------------------------------

    def __enter__(self) -> BlockPipeline:
        if self._threaded:
            try:
                for name, target in (("reader", self._read_loop), ("writer", self._write_loop)):
                    thread = threading.Thread(target=target, name=f"enclaveml-sealed-{name}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            except BaseException:
                self._shut_down(cancel=True)
                raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shut_down(cancel=exc_type is not None)
        if exc_type is None and self._write_error is not None:
            raise self._write_error

    def blocks(self) -> Iterator[memoryview]:
        """Yield the input in order, as views of pooled buffers, each valid until the next is requested."""
        while True:
            if self._threaded:
                item = self._filled.get()
                if isinstance(item, _Failure):
                    raise item.error
                buffer, count = item
            else:
                buffer = self._in_pool[0]
                count = fill(self._source, buffer)
            if count:
                yield buffer[:count]
            if self._threaded:
                self._free_in.put(buffer)
            if count < len(buffer):  # fill() returns short only at the end of the input
                return

    def output(self) -> memoryview:
        """Return a free output buffer (waits while all of them are queued for writing)."""
        if not self._threaded:
            return self._out_pool[0]
        item = self._free_out.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def send(self, buffer: memoryview, count: int) -> None:
        """Queue ``buffer[:count]`` (``buffer`` from :meth:`output`) for writing, then back to the pool."""
        self._queue_write(buffer[:count], buffer)

    def send_bytes(self, data: Blob) -> None:
        """Queue ``data`` for writing after what was sent before; the caller must not change it afterwards."""
        self._queue_write(memoryview(data), None)

    def _queue_write(self, view: memoryview, recycle: memoryview | None) -> None:
        if self._write_error is not None:
            raise self._write_error
        if not self._threaded:
            self._sink(view)
        elif view or recycle is not None:
            self._to_write.put((view, recycle))

    def _shut_down(self, *, cancel: bool) -> None:
        """Stop and join the helpers (uninterruptibly), then zero both pools."""
        if cancel:
            self._cancelled.set()
        self._free_in.put(_STOP)
        self._to_write.put(_STOP)
        interrupted: BaseException | None = None
        for thread in self._threads:
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt: join first, then raise
                    interrupted = interrupted or exc
        self._threads.clear()
        for view in (*self._in_pool, *self._out_pool):
            wipe(view)
        if interrupted is not None:
            raise interrupted

    # --- the helper threads -----------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                buffer = self._free_in.get()
                if isinstance(buffer, _Stop) or self._cancelled.is_set():
                    return
                count = fill(self._source, buffer)
                self._filled.put((buffer, count))
                if count < len(buffer):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            self._filled.put(_Failure(exc))

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._to_write.get()
                if isinstance(item, _Stop):
                    return
                view, recycle = item
                if not self._cancelled.is_set():
                    self._sink(view)
                if recycle is not None:
                    self._free_out.put(recycle)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            self._write_error = exc
            self._free_out.put(_Failure(exc))
