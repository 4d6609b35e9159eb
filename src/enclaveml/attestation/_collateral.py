"""Intel DCAP verification collateral: what it is, where it comes from, and when it is valid.

This module owns :class:`Collateral` (a dcap-qvl ``QuoteCollateralV3`` plus what we derive
from it once: TEE type, FMSPC, PCK CA and validity window), the small
:class:`CollateralSource` interface the DCAP verifier asks for collateral, and two sources:
:class:`LocalCollateral` (dcap-qvl collateral JSON files) here, and
:class:`~enclaveml.attestation._pccs.PccsCollateral` (a PCCS or Intel PCS over HTTP, with an
on-disk cache) in ``_pccs.py``.

Collateral file format (dcap-qvl ``QuoteCollateralV3`` JSON), one object with the keys
``tcb_info`` / ``qe_identity`` (the exact signed JSON text as served by Intel),
``tcb_info_signature`` / ``qe_identity_signature`` (hex, 64-byte r||s), ``root_ca_crl`` /
``pck_crl`` (hex of DER CRLs) and ``tcb_info_issuer_chain`` / ``qe_identity_issuer_chain`` /
``pck_crl_issuer_chain`` (PEM).

Validity (the same edges dcap-qvl enforces): TCB info and QE identity are valid from
``issueDate`` through ``nextUpdate`` inclusive; each CRL is valid strictly before its
``nextUpdate`` (its ``thisUpdate`` is not enforced).

Age: Intel numbers each TCB evaluation (``tcbEvaluationDataNumber`` in TCB info and QE
identity) and raises it with every TCB recovery. An older set stays valid for weeks after a
newer one is published, and judges the platform by the older evaluation (a platform that needs
a microcode update after a recovery is still ``UpToDate`` there). So sources prefer the highest
number, the PCCS cache never goes back below the highest one that has verified a quote, and
policies can require a minimum (``tcb_status.min_evaluation_data_number``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import dcap_qvl
from cryptography import x509
from cryptography.x509.oid import NameOID

from enclaveml.attestation._time import to_datetime
from enclaveml.attestation.evidence import TeeType
from enclaveml.errors import CollateralError, CollateralExpiredError

__all__ = ["Collateral", "CollateralSource", "LocalCollateral", "ValidityPeriod", "utc_text"]

_log = logging.getLogger(__name__)
_FMSPC_RE = re.compile(r"^[0-9A-Fa-f]{12}$")
_PCK_CAS = {"Intel SGX PCK Processor CA": "processor", "Intel SGX PCK Platform CA": "platform"}
_QE_IDS = {"QE": TeeType.SGX, "TD_QE": TeeType.TDX}


def utc_text(unix: int) -> str:
    """Unix seconds as ISO 8601 UTC with a ``Z``, the way Intel writes collateral dates."""
    try:
        return to_datetime(unix).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # beyond year 9999: still say which second
        return f"unix time {unix}"


@dataclass(frozen=True, slots=True)
class ValidityPeriod:
    """When one collateral item is valid: ``not_before`` .. ``not_after``, both inclusive seconds.

    ``not_before`` is None where dcap-qvl enforces no start (CRL ``thisUpdate``).
    """

    item: str
    not_before: int | None
    not_after: int

    def contains(self, now: int) -> bool:
        return (self.not_before is None or self.not_before <= now) and now <= self.not_after

    def __str__(self) -> str:
        if self.not_before is None:
            return f"{self.item} valid until {utc_text(self.not_after)}"
        return f"{self.item} valid {utc_text(self.not_before)}..{utc_text(self.not_after)}"


class Collateral:
    """One set of DCAP collateral for a (TEE, FMSPC, PCK CA), parsed once when it is loaded.

    Verifying many quotes against the same collateral then costs nothing beyond dcap-qvl's own
    checks: the JSON and CRL parsing happens here, not per verification. ``qvl`` is what
    dcap-qvl takes; ``tee``, ``fmspc`` (upper case) and ``ca`` ("processor"/"platform") say
    which platforms it serves; ``periods`` and ``expiry_datetime`` (the last valid second)
    say when.
    """

    __slots__ = (
        "_end",
        "_start",
        "ca",
        "evaluation_data_number",
        "expiry_datetime",
        "fmspc",
        "issued",
        "periods",
        "qvl",
        "tee",
    )

    def __init__(self, qvl: dcap_qvl.QuoteCollateralV3) -> None:
        self.qvl = qvl
        tcb, tcb_period = _json_period(qvl.tcb_info, "tcb_info")
        qe, qe_period = _json_period(qvl.qe_identity, "qe_identity")
        # TCB info v2 (SGX only) has no "id"; v3 names the TEE.
        tcb_id = tcb.get("id", "SGX")
        if tcb_id not in ("SGX", "TDX") or _QE_IDS.get(str(qe.get("id"))) is not TeeType(tcb_id.lower()):
            raise CollateralError(f"collateral mixes TCB info '{tcb_id}' with QE identity '{qe.get('id')}'")
        self.tee = TeeType(tcb_id.lower())
        fmspc = tcb.get("fmspc")
        if not isinstance(fmspc, str) or not _FMSPC_RE.match(fmspc):
            raise CollateralError(f"collateral tcb_info has an invalid fmspc {fmspc!r}")
        self.fmspc = fmspc.upper()
        pck_crl, pck_period = _crl_period(qvl.pck_crl, "pck_crl")
        names = pck_crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        ca = _PCK_CAS.get(str(names[0].value)) if names else None
        if ca is None:
            raise CollateralError(
                f"collateral pck_crl is not from an Intel PCK CA: {pck_crl.issuer.rfc4514_string()}"
            )
        self.ca = ca
        self.periods = (tcb_period, qe_period, pck_period, _crl_period(qvl.root_ca_crl, "root_ca_crl")[1])
        self.issued = max(tcb_period.not_before or 0, qe_period.not_before or 0)
        # The evaluation both items belong to; the lower one if they differ (the older judges).
        self.evaluation_data_number = min(
            _evaluation_number(tcb, "tcb_info"), _evaluation_number(qe, "qe_identity")
        )
        self._start = max(p.not_before for p in self.periods if p.not_before is not None)
        self._end = min(p.not_after for p in self.periods)
        self.expiry_datetime = to_datetime(self._end)

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        """Load dcap-qvl ``QuoteCollateralV3`` JSON."""
        try:
            raw = text.decode() if isinstance(text, bytes) else text
            return cls(dcap_qvl.QuoteCollateralV3.from_json(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CollateralError(f"malformed DCAP collateral JSON: {exc}") from exc

    def to_json(self) -> str:
        return str(self.qvl.to_json())

    @property
    def expiry(self) -> int:
        """The last second (Unix, inclusive) at which every item is still valid."""
        return self._end

    def valid_at(self, now: int) -> bool:
        return self._start <= now <= self._end

    def check_valid_at(self, now: int) -> None:
        """Raise CollateralExpiredError naming the first item not valid at ``now``."""
        if self._start <= now <= self._end:
            return
        bad = next(p for p in self.periods if not p.contains(now))
        raise CollateralExpiredError(
            f"collateral not valid at {utc_text(now)}: {bad}; fetch collateral valid at that time "
            "or verify at a time inside its window"
        )

    def __repr__(self) -> str:
        return f"Collateral({self.tee.value}/{self.fmspc}/{self.ca}, valid until {utc_text(self._end)})"


@runtime_checkable
class CollateralSource(Protocol):
    """Supplies the collateral for a quote's TEE type, platform FMSPC and PCK CA."""

    def get(self, *, tee: TeeType, fmspc: str, ca: str, now: int) -> Collateral:
        """Return collateral for this platform, preferably valid at ``now``; raise CollateralError."""
        ...


def _json_period(text: str, item: str) -> tuple[dict[str, Any], ValidityPeriod]:
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        start, end = (datetime.fromisoformat(str(obj.get(k))) for k in ("issueDate", "nextUpdate"))
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("issueDate/nextUpdate without a time zone")
    except ValueError as exc:
        raise CollateralError(f"collateral {item} is malformed: {exc}") from exc
    return obj, ValidityPeriod(item, int(start.timestamp()), int(end.timestamp()))


def _evaluation_number(obj: dict[str, Any], item: str) -> int:
    number = obj.get("tcbEvaluationDataNumber")
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise CollateralError(f"collateral {item} has no valid tcbEvaluationDataNumber ({number!r})")
    return number


def _crl_period(der: bytes, item: str) -> tuple[x509.CertificateRevocationList, ValidityPeriod]:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise CollateralError(f"collateral {item} is not a DER CRL: {exc}") from exc
    if crl.next_update_utc is None:
        raise CollateralError(f"collateral {item} has no nextUpdate")
    # dcap-qvl rejects now == nextUpdate, so the last valid second is one before it.
    return crl, ValidityPeriod(item, None, int(crl.next_update_utc.timestamp()) - 1)


def _normalise(tee: TeeType, fmspc: str, ca: str) -> tuple[TeeType, str, str]:
    if tee not in (TeeType.SGX, TeeType.TDX):
        raise CollateralError(f"DCAP collateral exists only for SGX and TDX, not {tee.value}")
    if not _FMSPC_RE.match(fmspc):
        raise CollateralError(f"invalid FMSPC {fmspc!r} (expected 12 hex digits)")
    if ca not in ("processor", "platform"):
        raise CollateralError(f"invalid PCK CA {ca!r} (expected 'processor' or 'platform')")
    return tee, fmspc.upper(), ca


def _pick(candidates: list[Collateral], now: int) -> Collateral:
    # Prefer the newest collateral valid at `now` (latest TCB evaluation, then latest issue);
    # otherwise the one that ends last, so the verifier's error names the window the operator has.
    valid = [c for c in candidates if c.valid_at(now)]
    if valid:
        return max(valid, key=lambda c: (c.evaluation_data_number, c.issued))
    return max(candidates, key=lambda c: c.expiry)


class LocalCollateral:
    """Collateral from one dcap-qvl collateral JSON file or a directory of them (``*.json``).

    Files are loaded and checked once, at construction; they are indexed by the TEE type and
    FMSPC inside each file's ``tcb_info`` and the PCK CA that issued its ``pck_crl``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        if self._path.is_dir():
            files = sorted(p for p in self._path.glob("*.json") if p.is_file())
            if not files:
                raise CollateralError(f"no collateral files (*.json) in {self._path}")
        elif self._path.is_file():
            files = [self._path]
        else:
            raise CollateralError(f"collateral path {self._path} does not exist")
        self._index: dict[tuple[TeeType, str, str], list[Collateral]] = {}
        for file in files:
            try:
                collateral = Collateral.from_json(file.read_bytes())
            except (OSError, CollateralError) as exc:
                raise CollateralError(f"collateral file {file}: {exc}") from exc
            self._index.setdefault((collateral.tee, collateral.fmspc, collateral.ca), []).append(collateral)

    def get(self, *, tee: TeeType, fmspc: str, ca: str, now: int) -> Collateral:
        candidates = self._index.get((tee, fmspc.upper(), ca))
        if candidates is not None and len(candidates) == 1:  # the common case, on every verification
            return candidates[0]
        key = _normalise(tee, fmspc, ca)
        if not candidates:
            have = ", ".join(f"{t.value}/{f}/{c}" for t, f, c in sorted(self._index)) or "none"
            raise CollateralError(
                f"no DCAP collateral for {key[0].value} FMSPC {key[1]} (PCK {key[2]} CA) in {self._path}; "
                f"it has: {have}"
            )
        return _pick(candidates, now)
