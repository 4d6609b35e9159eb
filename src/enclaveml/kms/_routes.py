"""The broker's HTTP routes and their JSON models (``docs/kbs-protocol.md``).

Admin handlers are plain ``def`` functions: FastAPI runs them in its thread pool, so SQLite
fsyncs never block the event loop. The two release routes are ``async`` and hand only the
broker call to the thread pool (see there). Handlers only decode base64, call the
:class:`~enclaveml.kms._service.KeyBroker` and shape the answer; errors are turned into
HTTP answers in one place, ``server.py``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from enclaveml.kms._metrics import BrokerMetrics
from enclaveml.kms._release import DEFAULT_KEM
from enclaveml.kms._service import InvalidRequestError, KeyBroker

__all__ = ["build_router"]


class _Model(BaseModel):
    # Strict: "3" is not a version and 1 is not a string. Unknown fields are ignored so that
    # newer clients can add optional fields without breaking older brokers.
    model_config = ConfigDict(strict=True)


class ChallengeOut(_Model):
    nonce: str = Field(description="base64 of 32 random bytes")
    expires_at: float = Field(description="Unix seconds")


class ReleaseIn(_Model):
    nonce: str = Field(description="base64 nonce from POST /v1/challenge")
    evidence: str = Field(description="base64 of Evidence.to_bytes()")
    public_key: str = Field(description="base64 of the workload's ephemeral HPKE public key")
    kem: str = Field(DEFAULT_KEM, description="MLKEM768-X25519 or X25519")
    version: int | None = Field(None, description="key version; null for the latest")


class ReleaseOut(_Model):
    key_id: str
    version: int
    kem: str
    ciphertext: str = Field(description="base64 HPKE ciphertext (enc || ct) of the 32-byte KEK")


class CreateKeyIn(_Model):
    key_id: str
    policy: dict[str, Any]


class PolicyIn(_Model):
    policy: dict[str, Any]


class KeyVersionOut(_Model):
    key_id: str
    version: int


class KeyStateOut(_Model):
    key_id: str
    state: str


class KeyIdOut(_Model):
    key_id: str


class KeyOut(_Model):
    key_id: str
    versions: list[int]
    latest: int
    state: str
    policy: dict[str, Any]


class KeyListOut(_Model):
    keys: list[KeyOut]


class WrapIn(_Model):
    plaintext: str = Field(description="base64 of 1..64 bytes (a data key)")
    aad: str = Field(description="base64 associated data")


class WrapOut(_Model):
    version: int
    wrapped: str


class AuditOut(_Model):
    records: list[dict[str, Any]]


class AuditVerifyOut(_Model):
    ok: bool
    records: int
    first_bad: int | None


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"field {field!r} is not valid standard base64") from None


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_bearer = HTTPBearer(auto_error=False, description="Admin token (enclaveml kbs token create)")


def _scope(required: str) -> Any:
    """A dependency yielding the name of a token that holds ``required`` (401/403 otherwise)."""

    def authenticate(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> str:
        broker: KeyBroker = request.app.state.broker
        token = credentials.credentials if credentials is not None else None
        return broker.authenticate(token, required).name

    return Depends(authenticate)


# Module level, not inside build_router: with postponed annotations FastAPI resolves these
# names in the module's globals.
KeysRead = Annotated[str, _scope("keys:read")]
KeysWrite = Annotated[str, _scope("keys:write")]
KeysDelete = Annotated[str, _scope("keys:delete")]
KeysWrap = Annotated[str, _scope("keys:wrap")]
PolicyWrite = Annotated[str, _scope("policy:write")]
AuditRead = Annotated[str, _scope("audit:read")]


def build_router(broker: KeyBroker, metrics: BrokerMetrics) -> APIRouter:
    """All routes of the protocol, bound to one broker (also reachable as ``app.state.broker``)."""
    router = APIRouter()

    @router.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # The two release routes are the hot path: async, so the request is parsed and the answer
    # written on the event loop, with exactly one hop to the thread pool for the broker call
    # (SQLite commits and evidence verification must not block the loop). They answer with a
    # ready JSONResponse: the response models only document the answer (OpenAPI), so FastAPI
    # does not validate and serialise it a second time.

    @router.post("/v1/challenge", tags=["release"], response_model=ChallengeOut)
    async def challenge() -> Response:
        issued = await run_in_threadpool(broker.challenge)
        return JSONResponse({"nonce": _b64e(issued.nonce), "expires_at": issued.expires_at})

    @router.post("/v1/keys/{key_id}/release", tags=["release"], response_model=ReleaseOut)
    async def release(key_id: str, body: ReleaseIn) -> Response:
        nonce = _b64(body.nonce, "nonce")
        evidence = _b64(body.evidence, "evidence")
        public_key = _b64(body.public_key, "public_key")
        released = await run_in_threadpool(
            broker.release, key_id, nonce, evidence, public_key, body.kem, body.version
        )
        return JSONResponse(
            {
                "key_id": released.key_id,
                "version": released.version,
                "kem": released.kem,
                "ciphertext": _b64e(released.ciphertext),
            }
        )

    @router.post("/v1/admin/keys", tags=["admin"], status_code=201)
    def create_key(body: CreateKeyIn, actor: KeysWrite) -> KeyVersionOut:
        version = broker.create_key(body.key_id, body.policy, actor=actor)
        return KeyVersionOut(key_id=body.key_id, version=version)

    @router.get("/v1/admin/keys", tags=["admin"])
    def list_keys(actor: KeysRead) -> KeyListOut:
        return KeyListOut(keys=[KeyOut(**info.to_dict()) for info in broker.list_keys()])

    @router.post("/v1/admin/keys/{key_id}/rotate", tags=["admin"])
    def rotate(key_id: str, actor: KeysWrite) -> KeyVersionOut:
        return KeyVersionOut(key_id=key_id, version=broker.rotate_key(key_id, actor=actor))

    @router.post("/v1/admin/keys/{key_id}/disable", tags=["admin"])
    def disable(key_id: str, actor: KeysWrite) -> KeyStateOut:
        broker.disable_key(key_id, actor=actor)
        return KeyStateOut(key_id=key_id, state="disabled")

    @router.post("/v1/admin/keys/{key_id}/enable", tags=["admin"])
    def enable(key_id: str, actor: KeysWrite) -> KeyStateOut:
        broker.enable_key(key_id, actor=actor)
        return KeyStateOut(key_id=key_id, state="enabled")

    @router.delete("/v1/admin/keys/{key_id}", tags=["admin"], status_code=204, response_class=Response)
    def delete(key_id: str, actor: KeysDelete) -> Response:
        broker.delete_key(key_id, actor=actor)
        return Response(status_code=204)

    @router.put("/v1/admin/keys/{key_id}/policy", tags=["admin"])
    def set_policy(key_id: str, body: PolicyIn, actor: PolicyWrite) -> KeyIdOut:
        broker.set_policy(key_id, body.policy, actor=actor)
        return KeyIdOut(key_id=key_id)

    @router.post("/v1/admin/keys/{key_id}/wrap", tags=["admin"])
    def wrap(key_id: str, body: WrapIn, actor: KeysWrap) -> WrapOut:
        plaintext, aad = _b64(body.plaintext, "plaintext"), _b64(body.aad, "aad")
        version, wrapped = broker.wrap(key_id, plaintext, aad, actor=actor)
        return WrapOut(version=version, wrapped=_b64e(wrapped))

    @router.get("/v1/admin/audit", tags=["admin"])
    def audit(
        actor: AuditRead,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditOut:
        return AuditOut(records=[r.to_dict() for r in broker.audit_records(after=after, limit=limit)])

    @router.get("/v1/admin/audit/verify", tags=["admin"])
    def audit_verify(actor: AuditRead) -> AuditVerifyOut:
        verdict = broker.verify_audit()
        return AuditVerifyOut(ok=verdict.ok, records=verdict.records, first_bad=verdict.first_bad)

    return router
