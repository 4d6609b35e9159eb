"""SEV-SNP verification against three real Milan reports, plus forged and tampered variants.

The real reports, VCEKs and the AMD ASK/ARK chain are described in data/README.md and their
expected field values in data/expected.json. Certificates for negative cases are generated
here: a forged ARK/ASK reusing AMD's names, and VCEKs re-signed by it (reusing the real VCEK's
public key, so the report signature itself would verify under the forged chain).
"""

from __future__ import annotations

import binascii
import json
import warnings
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml.attestation import SnpGuest, policy_from_dict
from enclaveml.attestation._snp import SnpVerifier, build_snp_cert_table, parse_snp_report
from enclaveml.attestation.claims import SnpClaims, SnpTcb
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import (
    CollateralError,
    CollateralExpiredError,
    ConfigurationError,
    PolicyRejectedError,
    VerificationError,
)

DATA = Path(__file__).parent / "data"
SNP = DATA / "sev-snp"
CASES = {k: v for k, v in json.loads((DATA / "expected.json").read_text())["cases"].items() if "sev-snp" in k}
NAMES = sorted(CASES)
# Inside every certificate window of the three cases (2023-04-03 .. 2029-09-24).
NOW = datetime(2026, 1, 1, tzinfo=UTC)
AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
TCB_OIDS = {"bootloader": "1", "tee": "2", "snp": "3", "microcode": "8"}


def report_bytes(name: str) -> bytes:
    raw = (SNP / CASES[name]["report"]).read_bytes()
    return binascii.unhexlify(raw.strip()) if CASES[name]["report"].endswith(".hex") else raw


def vcek_der(name: str) -> bytes:
    return (SNP / CASES[name]["vcek"]).read_bytes()


def amd_chain() -> tuple[x509.Certificate, x509.Certificate]:
    ask, ark = x509.load_pem_x509_certificates((SNP / "ask_ark_milan.pem").read_bytes())
    return ask, ark


def load_vcek(name: str) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD's serial-0 VCEKs (see _snp module docstring)
        return x509.load_der_x509_certificate(vcek_der(name))


def tcb_hex(tcb: SnpTcb) -> str:
    return bytes([tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode]).hex()


@pytest.mark.parametrize("name", NAMES)
def test_parsed_fields_match_expected(name: str) -> None:
    expected: dict[str, Any] = CASES[name]["fields"]
    report = parse_snp_report(report_bytes(name))
    assert report.version == expected["version"]
    assert report.guest_svn == expected["guest_svn"]
    assert report.policy == expected["policy"]
    assert report.vmpl == expected["vmpl"]
    assert report.signature_algo == expected["sig_algo"]
    assert report.platform_info == expected["platform_info"]
    for field in ("family_id", "image_id", "report_data", "measurement", "host_data", "id_key_digest"):
        assert getattr(report, field).hex() == expected[field], field
    for field in ("author_key_digest", "report_id", "chip_id"):
        assert getattr(report, field).hex() == expected[field], field
    assert report.reported_tcb_raw.hex() == expected["reported_tcb"]
    for field in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
        assert tcb_hex(getattr(report, field)) == expected[field], field
    vcek_tcb = CASES[name]["vcek_tcb"]
    assert report.reported_tcb == SnpTcb(vcek_tcb["bl"], vcek_tcb["tee"], vcek_tcb["snp"], vcek_tcb["ucode"])
    assert report.signed_data == report_bytes(name)[:0x2A0]
    assert report.debug == bool(expected["policy"] & (1 << 19))


def check_claims(name: str, claims: SnpClaims, *, vcek_end: datetime | None = None) -> None:
    expected = CASES[name]["fields"]
    assert isinstance(claims, SnpClaims)
    assert claims.tee is TeeType.SEV_SNP
    assert claims.measurement.hex() == expected["measurement"]
    assert claims.report_data.hex() == expected["report_data"]
    assert claims.host_data.hex() == expected["host_data"]
    assert claims.chip_id.hex() == expected["chip_id"]
    assert claims.id_key_digest.hex() == expected["id_key_digest"]
    assert claims.author_key_digest.hex() == expected["author_key_digest"]
    assert claims.family_id.hex() == expected["family_id"]
    assert claims.image_id.hex() == expected["image_id"]
    assert tcb_hex(claims.reported_tcb) == expected["reported_tcb"]
    assert (claims.policy, claims.guest_svn, claims.vmpl) == (expected["policy"], expected["guest_svn"], 0)
    assert (claims.report_version, claims.platform_info) == (expected["version"], expected["platform_info"])
    assert claims.debug == (name == "sev-snp/gsg_milan")  # only gsg's policy 0xB0000 sets bit 19
    assert claims.tcb_status is None
    # The VCEK expires long before the ASK and ARK, so it sets the collateral expiry.
    assert claims.collateral_expiry == (
        vcek_end or datetime.fromisoformat(CASES[name]["vcek_validity_utc"][1])
    )


@pytest.mark.parametrize("name", NAMES)
def test_verifies_with_configured_vcek(name: str) -> None:
    claims = SnpVerifier(vcek=vcek_der(name)).verify(Evidence(TeeType.SEV_SNP, report_bytes(name)), now=NOW)
    check_claims(name, claims)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_chain", [False, True])
def test_verifies_with_cert_table_in_aux(name: str, with_chain: bool) -> None:
    ask, ark = amd_chain()
    table = (
        build_snp_cert_table(vcek_der(name), ask.public_bytes(Encoding.DER), ark.public_bytes(Encoding.DER))
        if with_chain
        else build_snp_cert_table(vcek_der(name))
    )
    evidence = Evidence(TeeType.SEV_SNP, report_bytes(name), table)
    check_claims(name, SnpVerifier().verify(evidence, now=int(NOW.timestamp())))


@pytest.mark.parametrize("name", NAMES)
def test_verifies_with_der_or_pem_in_aux(name: str) -> None:
    vcek = load_vcek(name)
    ask, ark = amd_chain()
    verifier = SnpVerifier()
    for aux in (
        vcek_der(name),
        vcek.public_bytes(Encoding.PEM) + ask.public_bytes(Encoding.PEM) + ark.public_bytes(Encoding.PEM),
        ark.public_bytes(Encoding.DER) + vcek_der(name),
    ):
        check_claims(name, verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(name), aux), now=NOW))


def test_aux_vcek_takes_precedence_over_configured_vcek() -> None:
    gsg = "sev-snp/gsg_milan"
    verifier = SnpVerifier(vcek=vcek_der("sev-snp/virtee_milan"))
    evidence = Evidence(TeeType.SEV_SNP, report_bytes(gsg), build_snp_cert_table(vcek_der(gsg)))
    check_claims(gsg, verifier.verify(evidence, now=NOW))


def test_serial_zero_vcek_raises_no_warning() -> None:
    name = "sev-snp/trustee_milan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verifier = SnpVerifier(vcek=vcek_der(name))
        verifier.verify(
            Evidence(TeeType.SEV_SNP, report_bytes(name), build_snp_cert_table(vcek_der(name))), now=NOW
        )


@pytest.mark.parametrize("name", NAMES)
def test_evidence_from_bytes_detects_sev_snp(name: str) -> None:
    evidence = Evidence.from_bytes((SNP / CASES[name]["report"]).read_bytes())
    assert evidence.tee is TeeType.SEV_SNP
    assert evidence.data == report_bytes(name)


def test_report_with_another_chips_vcek_is_rejected() -> None:
    verifier = SnpVerifier(vcek=vcek_der("sev-snp/virtee_milan"))
    with pytest.raises(VerificationError, match="hwID does not match"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes("sev-snp/gsg_milan")), now=NOW)


@pytest.mark.parametrize("name", NAMES)
def test_every_single_byte_flip_is_rejected(name: str) -> None:
    # Covers the signed region [0, 0x2A0), the signature (0x2A0..0x330) and the reserved tail.
    original = report_bytes(name)
    verifier = SnpVerifier(vcek=vcek_der(name))
    accepted = []
    for offset in range(len(original)):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        try:
            verifier.verify(Evidence(TeeType.SEV_SNP, bytes(tampered)), now=NOW)
        except VerificationError:
            continue
        accepted.append(offset)
    assert accepted == []
    verifier.verify(Evidence(TeeType.SEV_SNP, original), now=NOW)  # the loop's control case


@pytest.mark.parametrize(
    ("now", "which"),
    [
        (datetime(2029, 9, 24, 0, 55, 29, tzinfo=UTC), "VCEK"),  # one second after gsg's VCEK expires
        (datetime(2022, 9, 24, 0, 55, 27, tzinfo=UTC), "VCEK"),  # one second before it starts
        (datetime(2020, 10, 22, 17, 0, tzinfo=UTC), "ARK"),  # before AMD's root existed
    ],
)
def test_now_outside_certificate_window_is_rejected(now: datetime, which: str) -> None:
    verifier = SnpVerifier(vcek=vcek_der("sev-snp/gsg_milan"))
    evidence = Evidence(TeeType.SEV_SNP, report_bytes("sev-snp/gsg_milan"))
    with pytest.raises(CollateralExpiredError, match=f"^{which} certificate is not valid at .* valid from"):
        verifier.verify(evidence, now=now)
    verifier.verify(evidence, now=datetime(2029, 9, 24, 0, 55, 28, tzinfo=UTC))  # the window is inclusive


def test_missing_vcek_says_how_to_supply_it() -> None:
    evidence = Evidence(TeeType.SEV_SNP, report_bytes("sev-snp/gsg_milan"))
    with pytest.raises(CollateralError, match=r"vcek=.*kdsintf\.amd\.com/vcek/v1/Milan/3ac3fe21"):
        SnpVerifier().verify(evidence, now=NOW)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda r: r[:-1],
        lambda r: r + b"\x00",
        lambda r: r[:0x2A0],
        lambda r: r.hex().encode(),
        lambda r: b"\x00" * len(r),
        lambda r: bytes(range(256)) * 4 + r[:160],
    ],
)
def test_truncated_or_garbage_report_is_rejected(mangle: Callable[[bytes], bytes]) -> None:
    verifier = SnpVerifier(vcek=vcek_der("sev-snp/gsg_milan"))
    with pytest.raises(VerificationError):
        verifier.verify(Evidence(TeeType.SEV_SNP, mangle(report_bytes("sev-snp/gsg_milan"))), now=NOW)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("common_name", [b"SEV-Milan", b"SEV-VCEK"])  # the VCEK's issuer, its subject
def test_a_vcek_name_of_the_wrong_asn1_type_is_an_attestation_error(name: str, common_name: bytes) -> None:
    """The VCEK travels with the evidence and is read before any signature check: one tag byte
    (UTF8String -> BIT STRING) makes cryptography raise TypeError on the lazily parsed name."""
    vcek = vcek_der(name)
    at = vcek.index(bytes([0x0C, len(common_name)]) + common_name)
    hostile = vcek[:at] + b"\x03" + vcek[at + 1 :]
    with pytest.raises((VerificationError, CollateralError), match="could not be processed"):
        SnpVerifier().verify(Evidence(TeeType.SEV_SNP, report_bytes(name), hostile), now=NOW)


def test_non_snp_evidence_is_rejected() -> None:
    with pytest.raises(VerificationError, match="cannot verify tdx"):
        SnpVerifier().verify(Evidence(TeeType.TDX, report_bytes("sev-snp/gsg_milan")), now=NOW)


# --- forged chains -------------------------------------------------------------------------


FORGED_START = datetime(2020, 1, 1, tzinfo=UTC)
FORGED_END = datetime(2040, 1, 1, tzinfo=UTC)


class Forger:
    """An attacker's ARK and ASK carrying AMD's exact names, and VCEKs signed by that ASK."""

    def __init__(self) -> None:
        amd_ask, amd_ark = amd_chain()
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.ask_key = rsa.generate_private_key(65537, 2048)
        self.ark = self._ca(amd_ark.subject, amd_ark.subject, self.ark_key, self.ark_key)
        self.ask = self._ca(amd_ask.subject, amd_ark.subject, self.ask_key, self.ark_key)

    @staticmethod
    def _ca(
        subject: x509.Name,
        issuer: x509.Name,
        key: rsa.RSAPrivateKey,
        signer: rsa.RSAPrivateKey,
        *,
        ca: bool = True,
    ) -> Any:
        return (
            x509.CertificateBuilder(subject_name=subject, issuer_name=issuer, public_key=key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(FORGED_START)
            .not_valid_after(FORGED_END)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA384(), rsa_padding=AMD_PSS)
        )

    def anchor_pem(self) -> bytes:
        return self.ask.public_bytes(Encoding.PEM) + self.ark.public_bytes(Encoding.PEM)

    def vcek(
        self,
        like: str,
        *,
        key: ec.EllipticCurvePublicKey | None = None,
        replace: dict[x509.ObjectIdentifier, bytes] | None = None,
        rsa_padding: padding.AsymmetricPadding = AMD_PSS,
    ) -> bytes:
        """A copy of case ``like``'s VCEK, re-signed by the forged ASK, with extensions replaced."""
        real = load_vcek(like)
        builder = x509.CertificateBuilder(
            subject_name=real.subject,
            issuer_name=self.ask.subject,
            public_key=key or real.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=FORGED_START,
            not_valid_after=FORGED_END,
        )
        for ext in real.extensions:
            value = (replace or {}).get(ext.oid)
            if value is not None:
                ext = x509.Extension(ext.oid, ext.critical, x509.UnrecognizedExtension(ext.oid, value))
            builder = builder.add_extension(ext.value, ext.critical)
        cert = builder.sign(self.ask_key, hashes.SHA384(), rsa_padding=rsa_padding)
        return cert.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def forger() -> Forger:
    return Forger()


GSG = "sev-snp/gsg_milan"


def test_forged_chain_in_aux_is_rejected_because_ark_is_not_pinned(forger: Forger) -> None:
    table = build_snp_cert_table(
        forger.vcek(GSG), forger.ask.public_bytes(Encoding.DER), forger.ark.public_bytes(Encoding.DER)
    )
    with pytest.raises(VerificationError, match="not the pinned AMD root"):
        SnpVerifier().verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG), table), now=NOW)


def test_forged_ask_without_ark_is_rejected(forger: Forger) -> None:
    table = build_snp_cert_table(forger.vcek(GSG), forger.ask.public_bytes(Encoding.DER))
    with pytest.raises(VerificationError, match="ASK certificate signature does not verify"):
        SnpVerifier().verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG), table), now=NOW)


def test_forged_vcek_under_amd_ask_is_rejected(forger: Forger) -> None:
    with pytest.raises(VerificationError, match="VCEK certificate signature does not verify"):
        SnpVerifier(vcek=forger.vcek(GSG)).verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG)), now=NOW)


def test_forged_chain_verifies_when_configured_as_the_anchor(forger: Forger) -> None:
    # Control for the tests above and below: the forged certificates are otherwise well-formed.
    verifier = SnpVerifier(ask_ark_pem=forger.anchor_pem())
    table = build_snp_cert_table(forger.vcek(GSG), None, forger.ark.public_bytes(Encoding.DER))
    check_claims(
        GSG,
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG), table), now=NOW),
        vcek_end=FORGED_END,
    )
    # ... and then AMD's own ARK in aux is refused: the pin is the configured root, whatever it is.
    amd_ark = amd_chain()[1].public_bytes(Encoding.DER)
    table = build_snp_cert_table(forger.vcek(GSG), None, amd_ark)
    with pytest.raises(VerificationError, match="not the pinned AMD root"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG), table), now=NOW)


def test_ask_that_is_not_a_ca_is_rejected(forger: Forger) -> None:
    not_ca = forger._ca(forger.ask.subject, forger.ark.subject, forger.ask_key, forger.ark_key, ca=False)
    table = build_snp_cert_table(forger.vcek(GSG), not_ca.public_bytes(Encoding.DER))
    with pytest.raises(VerificationError, match="ASK certificate is not a CA"):
        SnpVerifier(ask_ark_pem=forger.anchor_pem()).verify(
            Evidence(TeeType.SEV_SNP, report_bytes(GSG), table), now=NOW
        )
    with pytest.raises(ConfigurationError, match="ASK certificate is not a CA"):
        SnpVerifier(ask_ark_pem=not_ca.public_bytes(Encoding.PEM) + forger.ark.public_bytes(Encoding.PEM))


def test_vcek_with_other_hwid_is_rejected(forger: Forger) -> None:
    chip_id = bytearray(parse_snp_report(report_bytes(GSG)).chip_id)
    chip_id[63] ^= 1
    verifier = SnpVerifier(
        ask_ark_pem=forger.anchor_pem(), vcek=forger.vcek(GSG, replace={HWID: bytes(chip_id)})
    )
    with pytest.raises(VerificationError, match="hwID does not match"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG)), now=NOW)


@pytest.mark.parametrize("component", sorted(TCB_OIDS))
def test_vcek_with_other_tcb_is_rejected(forger: Forger, component: str) -> None:
    oid = x509.ObjectIdentifier(f"1.3.6.1.4.1.3704.1.3.{TCB_OIDS[component]}")
    reported = getattr(parse_snp_report(report_bytes(GSG)).reported_tcb, component)
    vcek = forger.vcek(GSG, replace={oid: bytes([0x02, 0x01, reported + 1])})
    verifier = SnpVerifier(ask_ark_pem=forger.anchor_pem(), vcek=vcek)
    with pytest.raises(
        VerificationError, match=f"TCB does not match.*{component} {reported + 1} != {reported}"
    ):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG)), now=NOW)


def test_vcek_with_right_hwid_and_tcb_but_other_key_is_rejected(forger: Forger) -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    verifier = SnpVerifier(ask_ark_pem=forger.anchor_pem(), vcek=forger.vcek(GSG, key=key))
    with pytest.raises(VerificationError, match="report signature does not verify"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG)), now=NOW)


@pytest.mark.parametrize(
    "rsa_padding",
    [padding.PKCS1v15(), padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32)],
    ids=["pkcs1v15", "pss-salt32"],
)
def test_vcek_signed_with_other_rsa_parameters_is_rejected(forger: Forger, rsa_padding: Any) -> None:
    verifier = SnpVerifier(ask_ark_pem=forger.anchor_pem(), vcek=forger.vcek(GSG, rsa_padding=rsa_padding))
    with pytest.raises(VerificationError, match="not signed with RSA-PSS"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG)), now=NOW)


@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")  # a flipped country name
def test_tampered_aux_is_rejected_unless_the_signed_certificate_content_is_unchanged() -> None:
    # Only VerificationError may escape; a flip may pass only where X.509 leaves bytes outside
    # tbsCertificate and the signature value unauthenticated (here: the PSS trailerField).
    table = build_snp_cert_table(vcek_der(GSG))
    verifier, original = SnpVerifier(), load_vcek(GSG)
    accepted = []
    for offset in range(len(table)):
        tampered = bytearray(table)
        tampered[offset] ^= 0x01
        try:
            verifier.verify(Evidence(TeeType.SEV_SNP, report_bytes(GSG), bytes(tampered)), now=NOW)
        except VerificationError:
            continue
        accepted.append(offset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(bytes(tampered[48:]))
        assert (cert.tbs_certificate_bytes, cert.signature) == (
            original.tbs_certificate_bytes,
            original.signature,
        )
    assert len(accepted) <= 2


@pytest.mark.parametrize("name", NAMES)
def test_snp_guest_rule_on_real_reports(name: str) -> None:
    """All three real reports: VMPL 0, SMT allowed, no migration agent, not single-socket."""
    claims = SnpVerifier(vcek=vcek_der(name)).verify(Evidence(TeeType.SEV_SNP, report_bytes(name)), now=NOW)
    assert isinstance(claims, SnpClaims)
    SnpGuest().check(claims)
    policy_from_dict({"type": "snp_guest", "max_vmpl": 0, "allow_smt": True}).check(claims)
    with pytest.raises(PolicyRejectedError, match="SMT"):
        SnpGuest(allow_smt=False).check(claims)
    with pytest.raises(PolicyRejectedError, match="SINGLE_SOCKET"):
        SnpGuest(require_single_socket=True).check(claims)
    with pytest.raises(PolicyRejectedError, match="vmpl=1"):
        SnpGuest().check(replace(claims, vmpl=1))
    with pytest.raises(PolicyRejectedError, match="MIGRATE_MA"):
        SnpGuest().check(replace(claims, policy=claims.policy | 1 << 18))
    SnpGuest(max_vmpl=1, allow_migrate_ma=True).check(replace(claims, vmpl=1, policy=claims.policy | 1 << 18))
    with pytest.raises(ConfigurationError):
        policy_from_dict({"type": "snp_guest", "allow_migrate_ma": "false"})  # a string would be truthy
