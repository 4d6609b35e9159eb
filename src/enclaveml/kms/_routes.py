"""The broker's HTTP routes and their JSON models (``docs/kbs-protocol.md``).

Admin handlers are plain ``def`` functions: FastAPI runs them in its thread pool, so SQLite
fsyncs never block the event loop. The two release routes are ``async`` and hand only the
broker call to a thread. Handlers only decode base64, call the
:class:`~enclaveml.kms._service.KeyBroker` and shape the answer; errors are turned into
HTTP answers in one place, ``server.py``.

Well-formed release requests, the broker's hot path, do not reach these routes at all:
:class:`ReleaseFastPath` (end of this module) answers them with the same broker calls and the
same answers for a fraction of FastAPI's per-request CPU. The FastAPI release routes still
document the protocol (OpenAPI) and answer everything the fast path hands on: malformed
requests get FastAPI's validation errors, exactly as before.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import Executor
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from enclaveml.kms._metrics import BrokerMetrics
from enclaveml.kms._release import DEFAULT_KEM
from enclaveml.kms._service import Challenge, InvalidRequestError, KeyBroker, Release

__all__ = ["ReleaseFastPath", "build_router"]

_T = TypeVar("_T")


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


class MinVersionIn(_Model):
    min_version: int = Field(
        description="the oldest key version the broker may release (>= 1, an existing version)"
    )


class MinVersionOut(_Model):
    key_id: str
    min_version: int


class KeyOut(_Model):
    key_id: str
    versions: list[int]
    latest: int
    min_version: int
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


def build_router(broker: KeyBroker, metrics: BrokerMetrics, executor: Executor | None = None) -> APIRouter:
    """All routes of the protocol, bound to one broker (also reachable as ``app.state.broker``).

    ``executor`` runs the release routes' broker calls (default: the event loop's default
    executor).
    """
    router = APIRouter()

    async def off_loop(call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    @router.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # The release routes (behind ReleaseFastPath, which answers well-formed requests itself):
    # async, so the request is parsed and the answer written on the event loop, with exactly
    # one hop to a thread for the broker call (SQLite commits and evidence verification must
    # not block the loop; a sync handler would cost a second hop, for validating the answer).
    # They answer with a ready JSONResponse: the response models only document the answer
    # (OpenAPI), so FastAPI does not validate and serialise it a second time.

    @router.post("/v1/challenge", tags=["release"], response_model=ChallengeOut)
    async def challenge() -> Response:
        issued = await off_loop(broker.challenge)
        return JSONResponse({"nonce": _b64e(issued.nonce), "expires_at": issued.expires_at})

    @router.post("/v1/keys/{key_id}/release", tags=["release"], response_model=ReleaseOut)
    async def release(key_id: str, body: ReleaseIn) -> Response:
        nonce = _b64(body.nonce, "nonce")
        evidence = _b64(body.evidence, "evidence")
        public_key = _b64(body.public_key, "public_key")
        released = await off_loop(
            functools.partial(broker.release, key_id, nonce, evidence, public_key, body.kem, body.version)
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

    @router.put("/v1/admin/keys/{key_id}/min-version", tags=["admin"])
    def set_min_version(key_id: str, body: MinVersionIn, actor: KeysWrite) -> MinVersionOut:
        broker.set_min_version(key_id, body.min_version, actor=actor)
        return MinVersionOut(key_id=key_id, min_version=body.min_version)

    @router.post("/v1/admin/keys/{key_id}/wrap", tags=["admin"])
    def wrap(key_id: str, body: WrapIn, actor: KeysWrap) -> WrapOut:
        plaintext, aad = _b64(body.plaintext, "plaintext"), _b64(body.aad, "aad")
        version, wrapped = broker.wrap(key_id, plaintext, aad, actor=actor)
        return WrapOut(version=version, wrapped=_b64e(wrapped))

    @router.get("/v1/admin/audit", tags=["admin"])
    def audit(
        actor: AuditRead,
        after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # a SQLite integer
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditOut:
        return AuditOut(records=[r.to_dict() for r in broker.audit_records(after=after, limit=limit)])

    @router.get("/v1/admin/audit/verify", tags=["admin"])
    def audit_verify(actor: AuditRead) -> AuditVerifyOut:
        verdict = broker.verify_audit()
        return AuditVerifyOut(ok=verdict.ok, records=verdict.records, first_bad=verdict.first_bad)

    return router


# -- the release hot path without FastAPI ---------------------------------------------------------

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]
_RELEASE_PATH = re.compile(r"/v1/keys/([^/]+)/release")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class ReleaseFastPath:
    """ASGI middleware answering well-formed requests of the two release routes directly.

    A release is two requests, and FastAPI's per-request machinery (routing, dependency
    solving, pydantic, exit stacks, exception wrappers) cost about as much CPU as the
    broker's own work for them. This answers ``POST /v1/challenge`` and ``POST
    /v1/keys/{key_id}/release`` itself when the release body is a JSON object whose fields
    have exactly the documented types (what ``ReleaseIn`` accepts, unknown fields ignored),
    with the same broker calls, the same answers and the same error bodies (``error_response``,
    from ``server.py``). Everything else, including every malformed release request, passes
    to FastAPI untouched, so validation errors keep their one implementation. It sits inside
    the body-limit and timing middlewares and sets ``scope["route"]`` for the latter.
    """

    def __init__(
        self,
        app: _ASGIApp,
        broker: KeyBroker,
        executor: Executor | None,
        error_response: Callable[[Exception, _Scope], Response | None],
        routes: Mapping[str, Any],
    ) -> None:
        self.app = app
        self._broker = broker
        self._executor = executor
        self._error_response = error_response
        self._challenge_route = routes["/v1/challenge"]
        self._release_route = routes["/v1/keys/{key_id}/release"]

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/v1/challenge":
            scope["route"] = self._challenge_route
            await self._answer(scope, receive, send, self._broker.challenge, _challenge_json)
            return
        match = _RELEASE_PATH.fullmatch(path)
        if match is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        fields = _release_fields(body)
        if fields is None:  # not the happy shape: FastAPI validates it and explains what is wrong
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self._release_route
        key_id = match.group(1)
        call = functools.partial(self._release, key_id, *fields)
        await self._answer(scope, receive, send, call, _release_json)

    def _release(
        self, key_id: str, nonce: str, evidence: str, public_key: str, kem: str, version: int | None
    ) -> Release:
        return self._broker.release(
            key_id,
            _b64(nonce, "nonce"),
            _b64(evidence, "evidence"),
            _b64(public_key, "public_key"),
            kem,
            version,
        )

    async def _answer(
        self,
        scope: _Scope,
        receive: _Receive,
        send: _Send,
        call: Callable[[], _T],
        render: Callable[[_T], bytes],
    ) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as exc:
            response = self._error_response(exc, scope)
            if response is None:
                raise
            await response(scope, receive, send)
            return
        body = render(result)
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_json(scope: _Scope) -> bool:
    """Whether the request's content type is JSON as FastAPI judges it (conservatively)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return bool(media == b"application/json") or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return False


async def _read_body(receive: _Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: _Receive) -> _Receive:
    delivered = False

    async def replay() -> _Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _release_fields(body: bytes) -> tuple[str, str, str, str, int | None] | None:
    """``ReleaseIn``'s fields if ``body`` is exactly what it accepts in strict mode, else None."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if type(data) is not dict:
        return None
    nonce, evidence, public_key = data.get("nonce"), data.get("evidence"), data.get("public_key")
    kem, version = data.get("kem", DEFAULT_KEM), data.get("version")
    if (
        type(nonce) is not str
        or type(evidence) is not str
        or type(public_key) is not str
        or type(kem) is not str
    ):
        return None
    if version is not None and type(version) is not int:  # strict: not a bool, float or string
        return None
    return nonce, evidence, public_key, kem, version


def _challenge_json(issued: Challenge) -> bytes:
    return json.dumps(
        {"nonce": _b64e(issued.nonce), "expires_at": issued.expires_at}, separators=(",", ":")
    ).encode()


def _release_json(released: Release) -> bytes:
    # Base64 needs no JSON escaping; the key id and KEM are encoded as JSON strings.
    return (
        f'{{"key_id":{json.dumps(released.key_id)},"version":{int(released.version)},'
        f'"kem":{json.dumps(released.kem)},"ciphertext":"{_b64e(released.ciphertext)}"}}'
    ).encode("ascii")
