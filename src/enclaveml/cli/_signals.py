"""SIGTERM that unwinds like Ctrl-C, for commands that hold temporary files.

``kill``, ``timeout``, ``systemctl stop`` and ``docker stop`` send SIGTERM, whose default action
ends the process where it stands: ``finally`` blocks and ``TemporaryDirectory`` clean-ups never
run, so a quantization's plaintext copies of a model, or the demo's working directory, stay
behind. Inside :func:`unwind_on_sigterm` SIGTERM raises ``SystemExit(143)`` instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["unwind_on_sigterm"]


@contextlib.contextmanager
def unwind_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(128 + 15)`` in the main thread while this block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
