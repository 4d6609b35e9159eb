"""Typed claims: what a verifier vouches for after checking evidence.

Claims are produced only by verifiers, after every signature and certificate check passed;
appraisal policies read them and nothing else. All classes are frozen dataclasses so a
policy cannot alter what it appraises.

Every claim set has the common fields of :class:`Claims` (``measurement`` is the TEE's
primary code identity: MRENCLAVE for SGX, MRTD for TDX, MEASUREMENT for SEV-SNP, the
workload digest for simulation); the subclasses add the TEE-specific fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from enclaveml.attestation.evidence import TeeType

__all__ = [
    "Claims",
    "SgxClaims",
    "SimulatedClaims",
    "SnpClaims",
    "SnpTcb",
    "TdxClaims",
]


@dataclass(frozen=True, kw_only=True)
class Claims:
    """Claims common to every TEE."""

    tee: TeeType
    measurement: bytes
    report_data: bytes
    debug: bool
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    collateral_expiry: datetime | None = None

    @property
    def simulated(self) -> bool:
        """True for simulation evidence, which protects nothing."""
        return self.tee is TeeType.SIMULATION

    @property
    def measurement_name(self) -> str:
        """What the TEE calls its primary measurement (used in messages)."""
        return "measurement"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: bytes as lowercase hex, datetimes as ISO 8601."""
        out: dict[str, Any] = {"simulated": self.simulated}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


@dataclass(frozen=True, kw_only=True)
class SgxClaims(Claims):
    """Claims of a verified SGX DCAP quote (v3)."""

    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes
    cpu_svn: bytes
    fmspc: str = ""
    qe_tcb_status: str | None = None
    platform_tcb_status: str | None = None
    quote_version: int = 3
    tcb_evaluation_data_number: int | None = None  # Intel's TCB evaluation the collateral belongs to

    @property
    def mrenclave(self) -> bytes:
        return self.measurement

    @property
    def measurement_name(self) -> str:
        return "mrenclave"


@dataclass(frozen=True, kw_only=True)
class TdxClaims(Claims):
    """Claims of a verified TDX DCAP quote (v4 or v5)."""

    rtmr: tuple[bytes, bytes, bytes, bytes]
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    td_attributes: bytes
    xfam: bytes
    tee_tcb_svn: bytes
    fmspc: str = ""
    qe_tcb_status: str | None = None
    platform_tcb_status: str | None = None
    quote_version: int = 4
    tcb_evaluation_data_number: int | None = None  # Intel's TCB evaluation the collateral belongs to

    @property
    def mrtd(self) -> bytes:
        return self.measurement

    @property
    def measurement_name(self) -> str:
        return "mrtd"


@dataclass(frozen=True, slots=True)
class SnpTcb:
    """An SEV-SNP TCB version (Milan/Genoa layout): boot loader, TEE, SNP firmware, microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    def __str__(self) -> str:
        return f"bl={self.bootloader},tee={self.tee},snp={self.snp},ucode={self.microcode}"

    def at_least(self, other: SnpTcb) -> bool:
        """True when every component is >= the corresponding one of ``other``."""
        return (
            self.bootloader >= other.bootloader
            and self.tee >= other.tee
            and self.snp >= other.snp
            and self.microcode >= other.microcode
        )


@dataclass(frozen=True, kw_only=True)
class SnpClaims(Claims):
    """Claims of a verified AMD SEV-SNP attestation report."""

    host_data: bytes
    policy: int
    reported_tcb: SnpTcb
    chip_id: bytes
    guest_svn: int
    vmpl: int
    family_id: bytes
    image_id: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_version: int
    platform_info: int = 0


@dataclass(frozen=True, kw_only=True)
class SimulatedClaims(Claims):
    """Claims of simulation evidence. It protects nothing: the key that signed it is on disk."""

    workload: str = ""
    signer_key_id: bytes = field(default=b"")
    issued_at: int = 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, TeeType):
        return value.value
    if isinstance(value, SnpTcb):
        return {
            "bootloader": value.bootloader,
            "tee": value.tee,
            "snp": value.snp,
            "microcode": value.microcode,
        }
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
