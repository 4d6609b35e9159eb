"""Serving processes keep the heap memory they free, instead of handing it back to the kernel at once.

Why: a serving process allocates and frees image-sized buffers for every request (TLS records,
the request body, the queue envelope, the decrypted payload, the batch). With glibc's defaults
such memory goes back to the kernel as soon as it is freed: a buffer above the dynamic mmap
threshold is a mapping of its own, and the heap top is trimmed once more than twice that
threshold is free. The next request then page-faults every page of its buffers back in (a 600 KB
buffer allocated and freed 64 times: 9,400 faults per round, measured; 0 with this setting),
which cost the secure serving path about 0.3 CPU ms per image (docs/benchmarks.md). Inside an
SGX enclave page faults are dearer still.

:func:`keep_freed_memory` sets the mmap threshold to 32 MiB (glibc's own ceiling for its dynamic
threshold) and the trim threshold to twice that: at most 64 MiB of freed memory stays mapped
after a peak. It changes the whole process, so only the entry points of serving processes call
it, never library code.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["keep_freed_memory"]

_log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 2 * _MMAP_THRESHOLD


def keep_freed_memory() -> bool:
    """Apply the thresholds above; False (and nothing changed) where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    if not applied:
        _log.debug("this C library ignores mallopt; freed memory is returned as it decides")
    return applied
