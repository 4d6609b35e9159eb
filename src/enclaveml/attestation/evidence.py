"""Evidence: what a TEE produces, and the one interface every evidence provider implements.

An :class:`Evidence` is the raw hardware artefact (a DCAP quote, an SEV-SNP report, or a
simulation token) plus optional auxiliary data (SEV-SNP certificates). It is never trusted
on its own: a verifier turns it into :class:`~enclaveml.attestation.claims.Claims`.

Wire format (``Evidence.to_bytes``), a CBOR map with text keys::

    {"v": 1, "tee": "sgx" | "tdx" | "sev-snp" | "simulation", "data": bstr, "aux": bstr}

``Evidence.from_bytes`` also accepts, so real artefacts can be handed over as they are:
a raw DCAP quote (SGX v3, TDX v4/v5; trailing zero padding allowed), a raw SEV-SNP report
(1184 bytes), or either of those as hex text.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import cbor2

from enclaveml._cbor import loads_exact
from enclaveml.errors import ConfigurationError, EvidenceError

__all__ = ["REPORT_DATA_SIZE", "Evidence", "EvidenceProvider", "TeeType", "check_report_data"]

REPORT_DATA_SIZE = 64
_ENVELOPE_VERSION = 1
_SNP_REPORT_SIZE = 0x4A0
_DCAP_TEE_TYPES = {0x00000000: "sgx", 0x00000081: "tdx"}


class TeeType(StrEnum):
    """The kinds of trusted execution environment enclaveml understands."""

    SGX = "sgx"
    TDX = "tdx"
    SEV_SNP = "sev-snp"
    SIMULATION = "simulation"


def check_report_data(report_data: bytes) -> bytes:
    """Return ``report_data`` if it is exactly 64 bytes, else raise ConfigurationError.

    Every TEE binds exactly 64 bytes of caller data; padding or truncating silently would
    let two different bindings produce the same evidence.
    """
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise ConfigurationError("report_data must be bytes")
    data = bytes(report_data)
    if len(data) != REPORT_DATA_SIZE:
        raise ConfigurationError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {len(data)}")
    return data


@dataclass(frozen=True, slots=True)
class Evidence:
    """Raw attestation evidence from one TEE.

    ``data`` is the signed artefact; ``aux`` carries what some TEEs hand out beside it
    (for SEV-SNP the configfs-tsm ``auxblob`` certificate table, or DER/PEM certificates).
    """

    tee: TeeType
    data: bytes
    aux: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.tee, TeeType):
            raise ConfigurationError(f"unknown TEE type {self.tee!r}")
        if not self.data:
            raise EvidenceError("evidence is empty")

    def __repr__(self) -> str:
        return f"Evidence(tee={self.tee.value!r}, data=<{len(self.data)} bytes>, aux=<{len(self.aux)} bytes>)"

    def to_bytes(self) -> bytes:
        """Encode as the CBOR envelope documented in this module."""
        return bytes(
            cbor2.dumps({"v": _ENVELOPE_VERSION, "tee": self.tee.value, "data": self.data, "aux": self.aux})
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> Evidence:
        """Decode the CBOR envelope, a raw DCAP quote, a raw SEV-SNP report, or hex text of either."""
        if not blob:
            raise EvidenceError("evidence is empty")
        # Binary artefacts are the hot path (a verifier decodes every quote): try them first.
        for raw in (blob, _maybe_unhex(blob)):
            detected = _detect_raw(raw)
            if detected is not None:
                return cls(detected, raw)
        return _decode_envelope(blob)


@runtime_checkable
class EvidenceProvider(Protocol):
    """Collects evidence inside a TEE, binding 64 bytes of caller data into it."""

    @property
    def tee(self) -> TeeType:
        """The kind of TEE this provider speaks for."""
        ...

    def collect(self, report_data: bytes) -> Evidence:
        """Return fresh evidence whose report data is exactly ``report_data`` (64 bytes)."""
        ...


def _maybe_unhex(blob: bytes) -> bytes:
    text = blob.strip()
    if len(text) % 2 == 0 and len(text) >= 2 * 48:
        if text[:2] in (b"0x", b"0X"):
            text = text[2:]
        try:
            return binascii.unhexlify(b"".join(text.split()))
        except (binascii.Error, ValueError):
            return blob
    return blob


def _detect_raw(raw: bytes) -> TeeType | None:
    if len(raw) >= 48:
        version, key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
        if version in (3, 4, 5) and key_type in (2, 3) and tee_type in _DCAP_TEE_TYPES:
            return TeeType(_DCAP_TEE_TYPES[tee_type])
    if len(raw) == _SNP_REPORT_SIZE:
        version, sig_algo = struct.unpack_from("<I", raw, 0)[0], struct.unpack_from("<I", raw, 0x34)[0]
        if version in (2, 3, 5) and sig_algo == 1:
            return TeeType.SEV_SNP
    return None


def _decode_envelope(blob: bytes) -> Evidence:
    try:
        obj = loads_exact(blob)
    except Exception as exc:
        raise EvidenceError(
            "evidence is neither a DCAP quote, an SEV-SNP report nor an enclaveml evidence envelope"
        ) from exc
    if not isinstance(obj, dict) or obj.get("v") != _ENVELOPE_VERSION:
        raise EvidenceError("unsupported evidence envelope (expected a CBOR map with v=1)")
    tee, data, aux = obj.get("tee"), obj.get("data"), obj.get("aux", b"")
    if not isinstance(data, bytes) or not isinstance(aux, bytes):
        raise EvidenceError("evidence envelope fields 'data' and 'aux' must be byte strings")
    try:
        tee_type = TeeType(str(tee))
    except ValueError as exc:
        raise EvidenceError(f"evidence envelope names an unknown TEE type {tee!r}") from exc
    return Evidence(tee_type, data, aux)
