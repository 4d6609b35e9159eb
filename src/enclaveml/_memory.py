"""Serving processes keep the heap memory they free, instead of handing it back to the kernel at once.

Why: a serving process allocates and frees image-sized buffers for every request (TLS records,
the request body, the queue envelope, the decrypted payload, the batch). With glibc's defaults
such memory goes back to the kernel as soon as it is freed: a buffer above the dynamic mmap
threshold is a mapping of its own, and the heap top is trimmed once more than twice that
threshold is free. The next request then page-faults its buffers back in (64 buffers of 600 KB
allocated and freed: 9,400 faults per round, 0 with this setting). Measured on the serving
benchmark's RA-TLS front end: 16 page faults per request before, 1 after (the worker: 1.5 and
0.05). On the benchmark VM that CPU time is below what its run-to-run noise resolves (under 0.1 ms
per image); it matters more where a fault is dearer: an SGX enclave with EDMM, where memory
handed back must be added to the enclave again, or a VM whose host reclaims free guest memory.

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
