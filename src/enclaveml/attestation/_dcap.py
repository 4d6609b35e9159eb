"""Intel DCAP quote verification (SGX quote v3, TDX quote v4 and v5) on top of dcap-qvl.

This module owns :class:`DcapVerifier`: it finds the signed part of a quote, asks a
:class:`~enclaveml.attestation._collateral.CollateralSource` for the platform's collateral,
checks the verification time against the collateral's validity window, lets dcap-qvl check
every signature, certificate chain, CRL and TCB level, and turns dcap-qvl's verified report
into typed :class:`SgxClaims` / :class:`TdxClaims`. It decides nothing about whether those
claims are acceptable; that is the appraisal policy's job.

Quote layout read here (little-endian; dcap-qvl parses everything else)::

    offset  size  field
    0       2     version (3 = SGX, 4 = TDX, 5 = TDX with a typed body)
    2       2     attestation key type (2 = ECDSA-P256)
    4       4     TEE type (0x00 = SGX, 0x81 = TDX)
    8       40    QE SVN, PCE SVN, QE vendor ID, user data
    48      B     body: v3 SGX report (384 B); v4 TD report 1.0 (584 B);
                  v5: u16 body type, u32 body size, then the body
    48+B    4     signature data length L
    52+B    L     quote signature, attestation key, QE report (+ signature), QE auth data, PCK chain

Real TDX quotes often carry zero padding after the ``52+B+L`` signed bytes. It is tolerated
and cut off; any non-zero byte there is rejected, because nothing signs it.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from typing import Any

import dcap_qvl
from cryptography import x509

from enclaveml.attestation._collateral import Collateral, CollateralSource, utc_text
from enclaveml.attestation._time import Instant, to_unix
from enclaveml.attestation.claims import SgxClaims, TdxClaims
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import CollateralError, CollateralExpiredError, ConfigurationError, VerificationError

__all__ = ["DcapVerifier"]

_HEADER_SIZE = 48
_TEE_TYPES = {TeeType.SGX: 0x00, TeeType.TDX: 0x81}
_VERSIONS = {TeeType.SGX: (3,), TeeType.TDX: (4, 5)}
_V3_V4_BODY_SIZE = {3: 384, 4: 584}
# How many distinct PCK certificate chains (one per platform) keep their parsed FMSPC/CA.
_PCK_CACHE_SIZE = 256
# dcap-qvl reports time failures only as text; these phrases mark them.
_TIME_FAILURE = re.compile(
    r"expired|in the future|not valid (?:yet|before|after)|NotValidYet|CrlExpired|CertExpired", re.IGNORECASE
)
_SGX_DEBUG = 0x02  # ATTRIBUTES.DEBUG: bit 1 of byte 0
_TD_DEBUG = 0x01  # TD_ATTRIBUTES.DEBUG: bit 0 of byte 0


class DcapVerifier:
    """Verifies SGX and TDX DCAP quotes against Intel collateral.

    ``collateral`` supplies TCB info, QE identity and CRLs for each platform. ``root_ca_der``
    replaces dcap-qvl's built-in Intel SGX Root CA as the trust anchor (tests, private roots).
    """

    def __init__(self, collateral: CollateralSource, *, root_ca_der: bytes | None = None) -> None:
        if root_ca_der is not None:
            try:
                x509.load_der_x509_certificate(root_ca_der)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError("root_ca_der must be a DER-encoded X.509 certificate") from exc
        self._source = collateral
        self._root_ca_der = root_ca_der
        # PEM chain -> (FMSPC, CA). dcap-qvl re-parses the PCK certificate for each of these
        # (~0.3 ms), while every quote from one platform carries the same chain.
        self._pck: dict[bytes, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def verify(self, evidence: Evidence, *, now: Instant = None) -> SgxClaims | TdxClaims:
        """Verify a DCAP quote at ``now`` and return its claims, or raise VerificationError.

        Raises CollateralExpiredError when ``now`` lies outside the collateral's (or a
        certificate's) validity, and CollateralError when no collateral can be had.
        """
        tee = evidence.tee
        if tee is not TeeType.SGX and tee is not TeeType.TDX:
            raise VerificationError(f"the DCAP verifier checks SGX and TDX quotes, not {tee.value} evidence")
        unix = to_unix(now)
        quote, version = _signed_quote(evidence.data, tee)
        try:
            parsed = dcap_qvl.parse_quote(quote)
        except ValueError as exc:
            raise VerificationError(f"malformed DCAP quote: {_reason(exc)}") from exc
        fmspc, ca = self._platform(parsed)
        collateral = self._source.get(tee=tee, fmspc=fmspc, ca=ca, now=unix)
        if (collateral.tee, collateral.fmspc, collateral.ca) != (tee, fmspc, ca):
            raise CollateralError(
                f"collateral source returned collateral for {collateral.tee.value}/{collateral.fmspc}/"
                f"{collateral.ca}, but the quote needs {tee.value}/{fmspc}/{ca}"
            )
        collateral.check_valid_at(unix)
        try:
            if self._root_ca_der is None:
                result = dcap_qvl.verify(quote, collateral.qvl, unix)
            else:
                result = dcap_qvl.verify_with_root_ca(quote, collateral.qvl, self._root_ca_der, unix)
        except (ValueError, OverflowError) as exc:
            reason = _reason(exc)
            if _TIME_FAILURE.search(reason):
                raise CollateralExpiredError(
                    f"collateral or certificate not valid at {utc_text(unix)}: {reason}"
                ) from exc
            raise VerificationError(f"DCAP quote verification failed: {reason}") from exc
        confirm = getattr(self._source, "confirm", None)
        if confirm is not None:  # the collateral's signatures held: a source may now rely on it
            confirm(collateral)
        try:
            return _claims(tee, version, json.loads(result.to_json()), fmspc, collateral)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise VerificationError(f"dcap-qvl returned a report we cannot read: {exc!r}") from exc

    def _platform(self, parsed: Any) -> tuple[str, str]:
        """FMSPC and PCK CA of the quote's PCK certificate, parsed once per certificate chain."""
        chain = parsed.cert_chain_pem_bytes()
        if not chain:
            raise VerificationError(
                "the quote carries no PCK certificate chain (certification data type 5 is required)"
            )
        hit = self._pck.get(chain)
        if hit is not None:
            return hit
        try:
            hit = (str(parsed.fmspc()).upper(), str(parsed.ca()))
        except ValueError as exc:
            raise VerificationError(
                f"cannot read FMSPC and CA from the PCK certificate: {_reason(exc)}"
            ) from exc
        with self._lock:
            if len(self._pck) >= _PCK_CACHE_SIZE:
                self._pck.pop(next(iter(self._pck)))
            self._pck[chain] = hit
        return hit


def _reason(exc: BaseException) -> str:
    # dcap-qvl messages span lines ("...\n\nCaused by:\n    ..."); keep them on one.
    return " ".join(str(exc).split()).removeprefix("Verification failed: ")


def _signed_quote(data: bytes, tee: TeeType) -> tuple[bytes, int]:
    """Return the signed bytes of the quote (padding cut off) and its version."""
    if len(data) < _HEADER_SIZE + 6:
        raise VerificationError(f"DCAP quote too short ({len(data)} bytes)")
    version, _key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if tee_type != _TEE_TYPES[tee]:
        raise VerificationError(f"evidence is labelled {tee.value} but the quote's TEE type is {tee_type:#x}")
    if version not in _VERSIONS[tee]:
        raise VerificationError(f"unsupported {tee.value} quote version {version}")
    if version == 5:
        body_end = _HEADER_SIZE + 6 + struct.unpack_from("<I", data, _HEADER_SIZE + 2)[0]
    else:
        body_end = _HEADER_SIZE + _V3_V4_BODY_SIZE[version]
    if len(data) < body_end + 4:
        raise VerificationError(f"DCAP quote truncated: {len(data)} bytes, body alone needs {body_end + 4}")
    signed = body_end + 4 + struct.unpack_from("<I", data, body_end)[0]
    if len(data) < signed:
        raise VerificationError(f"DCAP quote truncated: {len(data)} bytes, signed length {signed}")
    if len(data) == signed:
        return data, version
    if data.count(0, signed) != len(data) - signed:
        raise VerificationError(f"DCAP quote has non-zero bytes after its signed length ({signed} bytes)")
    return data[:signed], version


def _claims(
    tee: TeeType, version: int, verified: dict[str, Any], fmspc: str, collateral: Collateral
) -> SgxClaims | TdxClaims:
    bodies: dict[str, dict[str, Any]] = verified["report"]
    qe_status = verified.get("qe_status") or {}
    platform_status = verified.get("platform_status") or {}
    common: dict[str, Any] = {
        "tee": tee,
        "tcb_status": verified["status"],
        "advisory_ids": tuple(verified["advisory_ids"]),
        "collateral_expiry": collateral.expiry_datetime,
        "fmspc": fmspc,
        "qe_tcb_status": qe_status.get("status"),
        "platform_tcb_status": platform_status.get("status"),
        "quote_version": version,
        "tcb_evaluation_data_number": collateral.evaluation_data_number,
    }
    h = bytes.fromhex
    if tee is TeeType.SGX:
        r = bodies["SgxEnclave"]
        attributes = h(r["attributes"])
        return SgxClaims(
            measurement=h(r["mr_enclave"]),
            report_data=h(r["report_data"]),
            debug=bool(attributes[0] & _SGX_DEBUG),
            mrsigner=h(r["mr_signer"]),
            isv_prod_id=int(r["isv_prod_id"]),
            isv_svn=int(r["isv_svn"]),
            attributes=attributes,
            cpu_svn=h(r["cpu_svn"]),
            **common,
        )
    # TD10 for v4 quotes; TD15 (TDREPORT 1.5) for v5 quotes with body type 3.
    (r,) = (body for name, body in bodies.items() if name.startswith("TD"))
    td_attributes = h(r["td_attributes"])
    return TdxClaims(
        measurement=h(r["mr_td"]),
        report_data=h(r["report_data"]),
        debug=bool(td_attributes[0] & _TD_DEBUG),
        rtmr=(h(r["rt_mr0"]), h(r["rt_mr1"]), h(r["rt_mr2"]), h(r["rt_mr3"])),
        mr_config_id=h(r["mr_config_id"]),
        mr_owner=h(r["mr_owner"]),
        mr_owner_config=h(r["mr_owner_config"]),
        mr_seam=h(r["mr_seam"]),
        td_attributes=td_attributes,
        xfam=h(r["xfam"]),
        tee_tcb_svn=h(r["tee_tcb_svn"]),
        **common,
    )
