"""Serving processes stop re-scanning their start-up objects, and look for reference cycles less often.

Why: CPython's cyclic garbage collector runs a young-generation pass whenever 700 more container
objects have been allocated than freed, and now and then a full pass over every tracked object.
After start-up a serving process tracks about 95,000 objects (FastAPI, pydantic, the ONNX
Runtime bindings, numpy), which every full pass visits again; and each burst of in-flight
requests crosses 700 allocations, so young passes run every few requests. In the serving
benchmark's null-model pass (about 18 s of load) the plaintext server spent 0.87 CPU-seconds
collecting (0.52 in 15 full passes), the RA-TLS front end 0.47, and they found nothing: the
request paths leave no reference cycles (``tests/integration/test_serving_garbage.py`` keeps it
so, for answered and refused requests, in-process and through the encrypted queue).

:func:`settle_collector` runs one full collection, then ``gc.freeze()``: every object alive
after start-up moves to the permanent generation and is never scanned again (it is still freed
when its reference count drops to zero; only a cycle among frozen objects would stay). The
young-generation threshold goes from 700 to 10,000: a pass now runs when cycles or long-lived
objects have actually accumulated, so at most about 10,000 objects of cyclic garbage wait for
it. Measured, three alternating null-model pairs (``benchmarks.serving --null-model``): CPU ms
per image, plaintext server 0.85 -> 0.77, front end 1.90 -> 1.78, worker unchanged (its loop
allocates little). It changes the whole process, so only the entry points of serving processes
call it, once their models are loaded and their app is built.
"""

from __future__ import annotations

import gc

__all__ = ["settle_collector"]

_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Collect once, freeze what survives, and raise the young generation's threshold (see above)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_THRESHOLD, middle, old)
