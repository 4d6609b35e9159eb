"""A bounded write-behind pipeline for the streaming file paths: the cipher in the caller, writes in a thread.

Why: sealing a page-cached file costs per block a read (a kernel copy out of the page cache,
or none when the input is memory-mapped: :mod:`._input_blocks`), the cipher, and a write (a
kernel copy into fresh page-cache pages, the dearest of the three). Run one after another
they add up. Here the calling thread gets each block and runs the cipher on it, and a writer
thread writes the previous blocks. ``write`` releases the GIL in the kernel and so does
``update_into`` of ``cryptography.cobblestone`` (a Python thread keeps running during a long
call), so the two threads overlap. A third thread reading ahead was measured too: it was
slower (about 0.75x openssl instead of 0.95x on an idle 2-core machine) because every block
then crossed between cores twice and each stage waited for wake-ups more often.

Shape and guarantees:

* A fixed pool of ``depth`` output buffers is allocated up front (plain ``bytearray``\\ s, so
  tracemalloc sees them) and reused: no per-block allocation, and memory is bounded by
  ``depth * out_size`` whatever the file size.
* Buffers are written in the order they were sent; the calling thread does all the cipher
  work and calls any progress callback itself.
* An exception in the writer thread is re-raised, as the same object, in the calling thread at
  its next interaction with the pipeline (or on leaving the ``with`` block). An exception in
  the calling thread cancels the writes still queued. Either way the writer has been joined
  before the ``with`` block is left (a KeyboardInterrupt during the join is held back until it
  has), and all buffers are zeroed, because some of them held plaintext.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final

from enclaveml.crypto._buffers import wipe
from enclaveml.crypto._sealed_io import Blob

__all__ = ["BlockPipeline"]


class _Stop:
    """Queue sentinel: the writer returns."""


class _Failure:
    """Queue item carrying the writer's exception to the calling thread."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_STOP: Final = _Stop()


class BlockPipeline:
    """Write what the caller sends to ``sink`` in a writer thread, behind the caller's cipher work.

    Use as a context manager::

        with input_blocks(reader, size) as blocks, BlockPipeline(output.write, out_size=...) as pipe:
            pipe.send_bytes(header)
            for block in blocks:
                out = pipe.output()                      # a free output buffer of out_size bytes
                pipe.send(out, cipher.update_into(block, out))
            pipe.send_bytes(cipher.finalize())
        # here every byte sent has been passed to sink, or an exception is propagating

    ``sink`` runs in the writer thread; it must write all of the view it is given or raise,
    and must not block for ever (it writes to a regular file).
    """

    def __init__(
        self,
        sink: Callable[[memoryview], object],
        *,
        out_size: int,
        depth: int = 3,
    ) -> None:
        if out_size < 1 or depth < 1:
            raise ValueError("out_size and depth must be positive")
        self._sink = sink
        self._out_pool = [memoryview(bytearray(out_size)) for _ in range(depth)]
        self._to_write: queue.SimpleQueue[tuple[memoryview, memoryview | None] | _Stop] = queue.SimpleQueue()
        self._free_out: queue.SimpleQueue[memoryview | _Failure] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._write_error: BaseException | None = None
        self._writer: threading.Thread | None = None
        for buffer in self._out_pool:
            self._free_out.put(buffer)

    # --- the calling thread's side ----------------------------------------------------------

    def __enter__(self) -> BlockPipeline:
        writer = threading.Thread(target=self._write_loop, name="enclaveml-sealed-writer", daemon=True)
        try:
            writer.start()
        except BaseException:
            self._shut_down(cancel=True)
            raise
        self._writer = writer
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shut_down(cancel=exc_type is not None)
        if exc_type is None and self._write_error is not None:
            raise self._write_error

    def output(self) -> memoryview:
        """Return a free output buffer (waits while all of them are queued for writing)."""
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
        if view or recycle is not None:
            self._to_write.put((view, recycle))

    def _shut_down(self, *, cancel: bool) -> None:
        """Stop and join the writer (uninterruptibly), then zero every buffer."""
        if cancel:
            self._cancelled.set()
        self._to_write.put(_STOP)
        interrupted: BaseException | None = None
        while self._writer is not None and self._writer.is_alive():
            try:
                self._writer.join()
            except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt: join first, then raise
                interrupted = interrupted or exc
        self._writer = None
        for view in self._out_pool:
            wipe(view)
        if interrupted is not None:
            raise interrupted

    # --- the writer thread ------------------------------------------------------------------

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
