"""The broker's release fast path (_routes.ReleaseFastPath) against FastAPI's own handling.

The fast path may answer a request only if FastAPI would have accepted it with the same
values; everything else must reach FastAPI untouched. These tests pin both halves, then
drive the real app in-process (no TLS) for the answers, errors and metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from enclaveml.attestation import EvidenceVerifier
from enclaveml.attestation.policy import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.kms._release import DEFAULT_KEM
from enclaveml.kms._rootkey import RootKey
from enclaveml.kms._routes import ReleaseFastPath, ReleaseIn, _release_fields
from enclaveml.kms.server import BrokerConfig, create_app

_FIELDS = ["nonce", "evidence", "public_key", "kem", "version", "extra"]
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _pydantic(body: bytes) -> tuple[str, str, str, str, int | None] | None:
    try:
        model = ReleaseIn.model_validate(json.loads(body))
    except (ValidationError, ValueError):
        return None
    return model.nonce, model.evidence, model.public_key, model.kem, model.version


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6))
def test_fast_path_accepts_only_what_the_model_accepts_with_the_same_values(data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    fast = _release_fields(body)
    if fast is not None:
        assert _pydantic(body) == fast


_well_typed = st.fixed_dictionaries(
    {"nonce": st.text(), "evidence": st.text(), "public_key": st.text()},
    optional={"kem": st.text(), "version": st.none() | st.integers(), "x": _values},
)


@settings(max_examples=200, deadline=None)
@given(_well_typed)
def test_fast_path_takes_every_well_typed_body(data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    fast = _release_fields(body)
    assert fast is not None
    assert fast == _pydantic(body)
    assert fast[3] == data.get("kem", DEFAULT_KEM)


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[1, 2]", b'"text"', b"null", b'{"nonce": "a"}', b"\xff\xfe", b"[" * 100_000],
)
def test_fast_path_leaves_malformed_bodies_to_fastapi(body: bytes) -> None:
    assert _release_fields(body) is None


class Workload:
    def __init__(self, provider: SimulationProvider) -> None:
        from cryptography.hazmat.primitives.asymmetric import x25519

        self.provider = provider
        self.public = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()

    def body(self, nonce_b64: str, **overrides: Any) -> dict[str, Any]:
        nonce = base64.b64decode(nonce_b64)
        digest = hashlib.sha256(nonce + self.public).digest()
        evidence = self.provider.collect(digest + bytes(32)).to_bytes()
        return {
            "nonce": nonce_b64,
            "evidence": base64.b64encode(evidence).decode(),
            "public_key": base64.b64encode(self.public).decode(),
            "kem": "X25519",
            **overrides,
        }


class Client:
    """Requests to the app in-process (no TLS, no lifespan) from synchronous tests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kwargs))

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()
        self.app.state.broker.store.close()


@pytest.fixture
def app_client(tmp_path: Path, sim_key: SimulationKey, sim_provider: SimulationProvider) -> Iterator[Client]:
    verifier = EvidenceVerifier(simulation=SimulationVerifier(sim_key.public_key()))
    app = create_app(
        BrokerConfig(db_path=tmp_path / "kbs.db", root_key=RootKey.generate(), verifier=verifier)
    )
    app.state.broker.create_key(
        "k", UnsafeAllowSimulation(AllOf(MeasurementAllowlist([sim_provider.measurement])))
    )
    client = Client(app)
    yield client
    client.close()


@pytest.fixture
def fast_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the fast path answered (as opposed to FastAPI)."""
    answered: list[str] = []
    real = ReleaseFastPath._answer

    async def spy(self: ReleaseFastPath, scope: Any, *args: Any) -> None:
        answered.append(scope["path"])
        await real(self, scope, *args)

    monkeypatch.setattr(ReleaseFastPath, "_answer", spy)
    return answered


def test_release_answers_and_errors_through_the_fast_path(
    app_client: Client, sim_provider: SimulationProvider, fast_answers: list[str]
) -> None:
    workload = Workload(sim_provider)
    challenge = app_client.post("/v1/challenge")
    assert challenge.status_code == 200
    assert challenge.headers["content-type"] == "application/json"
    assert set(challenge.json()) == {"nonce", "expires_at"}
    body = workload.body(challenge.json()["nonce"])
    released = app_client.post("/v1/keys/k/release", json=body)
    assert released.status_code == 200, released.text
    assert set(released.json()) == {"key_id", "version", "kem", "ciphertext"}
    assert released.json()["key_id"] == "k"
    assert released.json()["version"] == 1
    replayed = app_client.post("/v1/keys/k/release", json=body)
    assert replayed.status_code == 403
    assert replayed.json()["error"] == "denied"
    assert replayed.json()["rule"] == "nonce"
    missing = app_client.post(
        "/v1/keys/nope/release", json=workload.body(app_client.post("/v1/challenge").json()["nonce"])
    )
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    bad_b64 = app_client.post("/v1/keys/k/release", json={**body, "public_key": "%%%"})
    assert bad_b64.status_code == 400
    assert bad_b64.json()["error"] == "bad_request"
    assert fast_answers == ["/v1/challenge", "/v1/keys/k/release", "/v1/keys/k/release", "/v1/challenge",
                            "/v1/keys/nope/release", "/v1/keys/k/release"]  # fmt: skip
    metrics = app_client.get("/metrics").text
    assert 'route="/v1/keys/{key_id}/release",status="200"' in metrics
    assert 'route="/v1/challenge",status="200"' in metrics
    assert 'enclaveml_kbs_releases_total{kem="X25519"} 1.0' in metrics
    assert 'enclaveml_kbs_denials_total{rule="nonce"} 1.0' in metrics


def test_malformed_releases_get_fastapis_answers(
    app_client: Client, sim_provider: SimulationProvider, fast_answers: list[str]
) -> None:
    nonce = app_client.post("/v1/challenge").json()["nonce"]
    good = Workload(sim_provider).body(nonce)
    cases = [
        app_client.post("/v1/keys/k/release", json={**good, "version": "1"}),
        app_client.post("/v1/keys/k/release", json={**good, "version": True}),
        app_client.post("/v1/keys/k/release", json={k: v for k, v in good.items() if k != "evidence"}),
        app_client.post("/v1/keys/k/release", content=b"{oops", headers={"content-type": "application/json"}),
        app_client.post(
            "/v1/keys/k/release", content=json.dumps(good), headers={"content-type": "text/plain"}
        ),
    ]
    for answer in cases:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "bad_request"
    assert "version" in cases[0].json()["message"]
    assert fast_answers == ["/v1/challenge"]  # none of the malformed ones
    # The nonce was not consumed by any of them: it still releases the key.
    assert app_client.post("/v1/keys/k/release", json=good).status_code == 200
    assert app_client.get("/v1/challenge").status_code == 405
