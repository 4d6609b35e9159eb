"""The simulation TEE: evidence for machines without TEE hardware. It protects NOTHING.

Simulation evidence has the same shape as real evidence (a measurement of the workload,
64 bytes of report data, a signature) so that the whole attestation flow can run and be
tested anywhere. Its signing key, however, lives in a file on the very machine it claims
to attest, so anyone with access to that machine can forge it. Therefore:

* it is produced only when asked for by name (``provider_by_name("simulation")``,
  ``--tee simulation``); :func:`~enclaveml.attestation.providers.detect` never picks it;
* it is verifiable only by a :class:`SimulationVerifier` holding its public key;
* every appraisal policy rejects it unless wrapped in the explicitly unsafe
  :class:`~enclaveml.attestation.policy.UnsafeAllowSimulation`;
* constructing a provider or verifier logs a warning.

Token format (``Evidence.data`` of a simulation evidence), CBOR::

    token   = [payload: bstr, signature: bstr]
    payload = {"v": 1, "measurement": bstr(48), "report_data": bstr(64),
               "workload": tstr, "iat": uint (Unix seconds), "kid": bstr(8)}
    signature = Ed25519(sign_key, "enclaveml-simulation-evidence-v1" || 0x00 || payload)

The measurement is SHA-384 over the installed enclaveml package files (sorted relative
paths and contents), the workload entry point and its canonical configuration, so a change
of code or configuration changes it just as it would change MRENCLAVE or MRTD.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclaveml._cbor import loads_exact
from enclaveml._files import write_atomically
from enclaveml.attestation._time import Instant, to_unix
from enclaveml.attestation.claims import SimulatedClaims
from enclaveml.attestation.evidence import Evidence, TeeType, check_report_data
from enclaveml.errors import ConfigurationError, VerificationError

__all__ = [
    "SIMULATION_WARNING",
    "SimulationKey",
    "SimulationProvider",
    "SimulationVerifier",
    "default_key_path",
    "workload_measurement",
]

_log = logging.getLogger(__name__)

SIMULATION_WARNING = (
    "SIMULATION TEE: this evidence is signed by a key stored on this machine and protects "
    "nothing. Use it for development and tests only; never hand real secrets to it."
)
_DOMAIN = b"enclaveml-simulation-evidence-v1\x00"
_FORMAT_VERSION = 1
_KEY_ENV = "ENCLAVEML_SIMULATION_KEY"
_MAX_TOKEN = 4096
_MAX_CLOCK_SKEW = 300


def default_key_path() -> Path:
    """Where the simulation signing key lives unless configured: $ENCLAVEML_SIMULATION_KEY or XDG data."""
    env = os.environ.get(_KEY_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "enclaveml" / "simulation-ed25519.pem"


class SimulationKey:
    """The Ed25519 key that signs simulation evidence; it refuses to be printed or pickled."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_bytes = raw
        self.key_id = hashlib.sha256(raw).digest()[:8]

    @classmethod
    def generate(cls) -> SimulationKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path | None = None) -> SimulationKey:
        """Load the key at ``path`` (default :func:`default_key_path`), creating it (mode 0600) if absent."""
        key_path = Path(path) if path is not None else default_key_path()
        try:
            pem = key_path.read_bytes()
        except FileNotFoundError:
            key = cls.generate()
            key._write(key_path)
            return key
        except OSError as exc:
            raise ConfigurationError(f"cannot read simulation key {key_path}: {exc.strerror}") from exc
        try:
            loaded = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise ConfigurationError(f"simulation key {key_path} is not a PEM Ed25519 private key") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigurationError(f"simulation key {key_path} is not an Ed25519 key")
        return cls(loaded)

    def _write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(path, pem, mode=0o600)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SimulationKey(key_id={self.key_id.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("SimulationKey cannot be pickled")


@functools.cache
def _package_digest() -> bytes:
    """SHA-384 over every file of the installed enclaveml package (sorted, caches excluded)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha384()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}:
            continue
        rel = path.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(4, "big") + rel)
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()


def workload_measurement(entry_point: str, config: Mapping[str, Any] | bytes | None = None) -> bytes:
    """The simulated measurement: SHA-384(package digest || entry point || canonical config)."""
    if isinstance(config, bytes):
        config_bytes = config
    else:
        config_bytes = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha384(b"enclaveml-simulated-workload-v1\x00")
    for part in (_package_digest(), entry_point.encode(), config_bytes):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.digest()


class SimulationProvider:
    """Produces simulation evidence. Only ever constructed when asked for by name."""

    def __init__(
        self,
        *,
        key: SimulationKey | None = None,
        key_path: str | Path | None = None,
        entry_point: str = "enclaveml",
        config: Mapping[str, Any] | bytes | None = None,
    ) -> None:
        if key is not None and key_path is not None:
            raise ConfigurationError("pass either key or key_path, not both")
        self._key = key if key is not None else SimulationKey.load_or_create(key_path)
        self._entry_point = entry_point
        self.measurement = workload_measurement(entry_point, config)
        _log.warning(SIMULATION_WARNING)

    @property
    def tee(self) -> TeeType:
        return TeeType.SIMULATION

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public key a :class:`SimulationVerifier` needs to check this provider's evidence."""
        return self._key.public_key()

    def collect(self, report_data: bytes) -> Evidence:
        data = check_report_data(report_data)
        payload = bytes(
            cbor2.dumps(
                {
                    "v": _FORMAT_VERSION,
                    "measurement": self.measurement,
                    "report_data": data,
                    "workload": self._entry_point,
                    "iat": int(time.time()),
                    "kid": self._key.key_id,
                }
            )
        )
        signature = self._key.sign(_DOMAIN + payload)
        return Evidence(TeeType.SIMULATION, bytes(cbor2.dumps([payload, signature])))


class SimulationVerifier:
    """Verifies simulation evidence against one explicitly configured public key."""

    def __init__(self, public_key: Ed25519PublicKey | bytes) -> None:
        if isinstance(public_key, bytes):
            try:
                public_key = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError as exc:
                raise ConfigurationError("simulation public key must be 32 raw Ed25519 bytes") from exc
        self._public_key = public_key
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._key_id = hashlib.sha256(raw).digest()[:8]
        _log.warning("simulation verifier enabled: %s", SIMULATION_WARNING)

    def verify(self, evidence: Evidence, *, now: Instant = None) -> SimulatedClaims:
        if evidence.tee is not TeeType.SIMULATION:
            raise VerificationError(f"simulation verifier cannot verify {evidence.tee.value} evidence")
        if len(evidence.data) > _MAX_TOKEN:
            raise VerificationError("simulation evidence is too large")
        now_unix = to_unix(now)
        payload, signature = _split_token(evidence.data)
        try:
            self._public_key.verify(signature, _DOMAIN + payload)
        except InvalidSignature as exc:
            raise VerificationError(
                "simulation evidence signature is invalid for the configured key"
            ) from exc
        fields = _decode_payload(payload)
        if fields["iat"] > now_unix + _MAX_CLOCK_SKEW:
            raise VerificationError(f"simulation evidence was issued in the future (iat={fields['iat']})")
        if fields["kid"] != self._key_id:
            raise VerificationError("simulation evidence key id does not match the configured key")
        return SimulatedClaims(
            tee=TeeType.SIMULATION,
            measurement=fields["measurement"],
            report_data=fields["report_data"],
            debug=False,
            workload=fields["workload"],
            signer_key_id=fields["kid"],
            issued_at=fields["iat"],
        )


def _split_token(token: bytes) -> tuple[bytes, bytes]:
    try:
        obj = loads_exact(token)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise VerificationError("simulation evidence is not valid CBOR") from exc
    if not (isinstance(obj, list | tuple) and len(obj) == 2 and all(isinstance(x, bytes) for x in obj)):
        raise VerificationError("simulation evidence must be a CBOR array [payload, signature]")
    return obj[0], obj[1]


def _decode_payload(payload: bytes) -> dict[str, Any]:
    obj = loads_exact(payload)  # signed by the configured key, so well-formed CBOR
    expected_types = {"measurement": bytes, "report_data": bytes, "workload": str, "iat": int, "kid": bytes}
    if not isinstance(obj, dict) or obj.get("v") != _FORMAT_VERSION:
        raise VerificationError("unsupported simulation evidence version")
    for name, typ in expected_types.items():
        if not isinstance(obj.get(name), typ):
            raise VerificationError(f"simulation evidence field {name!r} is missing or has the wrong type")
    if len(obj["report_data"]) != 64 or len(obj["measurement"]) != 48:
        raise VerificationError("simulation evidence has a malformed measurement or report_data")
    return obj
