"""``GET /attestation?nonce=HEX`` for servers whose evidence also binds a plan (FL aggregator, vertical FL).

The route answers fresh evidence bound to the server's TLS key and to ``bind(client nonce)``
(the FL servers pass :func:`enclaveml.fl.plan.fresh_nonce` of their plan), as CBOR
``{"evidence", "endorsements"}`` from the RA-TLS hook. Quotes are expensive and anyone may ask for
one, so the work is bounded, not queued: beyond ``max_in_flight`` concurrent requests the answer
is 429 with ``Retry-After``. Nonces are 16 to 64 bytes, as hex.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

__all__ = ["add_bound_attestation_route"]

_HEX_NONCE = re.compile(r"[0-9a-fA-F]{32,128}")


def add_bound_attestation_route(
    app: FastAPI,
    hook: Callable[[bytes], bytes] | None,
    bind: Callable[[bytes], bytes],
    *,
    max_in_flight: int = 8,
) -> None:
    """Register ``GET /attestation`` on ``app`` (see the module docstring); no hook: 404."""
    in_flight = [0]  # only touched on the event loop

    @app.get("/attestation")
    async def fresh_attestation(nonce: Annotated[str, Query(max_length=128)]) -> Response:
        if hook is None:
            return JSONResponse({"error": "this server has no attestation hook"}, status_code=404)
        if not _HEX_NONCE.fullmatch(nonce) or len(nonce) % 2:
            return JSONResponse({"error": "nonce must be 16-64 bytes as hex"}, status_code=400)
        if in_flight[0] >= max_in_flight:
            return JSONResponse({"error": "too many attestations in flight"}, 429, {"Retry-After": "1"})
        in_flight[0] += 1
        try:
            evidence = await run_in_threadpool(hook, bind(bytes.fromhex(nonce)))
        finally:
            in_flight[0] -= 1
        return Response(evidence, media_type="application/cbor", headers={"Cache-Control": "no-store"})
