"""SEV-SNP byte formats: report layout, certificate table, aux decoding, and verifier configuration.

The report layout is checked against an encoder written here from the ABI table (not from the
parser), with a distinct value in every field, so a wrong offset cannot go unnoticed.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaveml.attestation._snp import SnpVerifier, parse_snp_aux
from enclaveml.attestation._snp_report import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    SnpCertificates,
    build_snp_cert_table,
    der_small_uint,
    parse_snp_cert_table,
    parse_snp_report,
    split_der_sequences,
)
from enclaveml.attestation.claims import SnpTcb
from enclaveml.errors import CollateralError, ConfigurationError, VerificationError

SNP = Path(__file__).parents[1] / "vectors" / "data" / "sev-snp"


def fill(size: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 + 1 for i in range(size))


def tcb(bl: int, tee: int, snp: int, ucode: int) -> bytes:
    return bytes([bl, tee, 0, 0, 0, 0, snp, ucode])


def encode_report(version: int = 2, *, sig_algo: int = 1, cpuid_family: int = 0x19) -> bytes:
    """An SEV-SNP report with a distinct value in every field, encoded from the ABI table."""
    out = bytearray(0x4A0)
    struct.pack_into("<IIQ", out, 0x000, version, 7, 0x30000 | 1 << 19)
    out[0x010:0x030] = fill(16, 1) + fill(16, 2)
    struct.pack_into("<II", out, 0x030, 2, sig_algo)
    out[0x038:0x040] = tcb(1, 2, 3, 4)
    struct.pack_into("<QI", out, 0x040, 0x3, 0b00011)
    for offset, size, seed in [(0x050, 64, 3), (0x090, 48, 4), (0x0C0, 32, 5), (0x0E0, 48, 6)]:
        out[offset : offset + size] = fill(size, seed)
    for offset, size, seed in [(0x110, 48, 7), (0x140, 32, 8), (0x160, 32, 9), (0x1A0, 64, 10)]:
        out[offset : offset + size] = fill(size, seed)
    out[0x180:0x188] = tcb(5, 6, 7, 8)
    out[0x188:0x18B] = bytes([cpuid_family, 0x01, 0x02])
    out[0x1E0:0x1E8] = tcb(9, 10, 11, 12)
    out[0x1E8:0x1EF] = bytes([13, 14, 15, 0, 16, 17, 18])
    out[0x1F0:0x1F8] = tcb(19, 20, 21, 22)
    struct.pack_into("<QQ", out, 0x1F8, 0x1122, 0x3344)
    out[0x2A0:0x2D0] = fill(48, 11)
    out[0x2E8:0x318] = fill(48, 12)
    return bytes(out)


@pytest.mark.parametrize("version", [2, 3, 5])
def test_every_field_is_read_from_its_offset(version: int) -> None:
    data = encode_report(version)
    r = parse_snp_report(data)
    assert (r.version, r.guest_svn, r.policy, r.vmpl, r.signature_algo) == (version, 7, 0xB0000, 2, 1)
    assert (r.family_id, r.image_id) == (fill(16, 1), fill(16, 2))
    assert (r.platform_info, r.flags, r.author_key_en, r.mask_chip_key, r.signing_key) == (
        3,
        3,
        True,
        True,
        0,
    )
    assert (r.report_data, r.measurement, r.host_data) == (fill(64, 3), fill(48, 4), fill(32, 5))
    assert (r.id_key_digest, r.author_key_digest) == (fill(48, 6), fill(48, 7))
    assert (r.report_id, r.report_id_ma, r.chip_id) == (fill(32, 8), fill(32, 9), fill(64, 10))
    assert r.current_tcb == SnpTcb(1, 2, 3, 4)
    assert (r.reported_tcb, r.reported_tcb_raw) == (SnpTcb(5, 6, 7, 8), tcb(5, 6, 7, 8))
    assert r.committed_tcb == SnpTcb(9, 10, 11, 12)
    assert r.launch_tcb == SnpTcb(19, 20, 21, 22)
    assert (r.current_build, r.current_minor, r.current_major) == (13, 14, 15)
    assert (r.committed_build, r.committed_minor, r.committed_major) == (16, 17, 18)
    assert r.cpuid_fam_id == (0x19 if version >= 3 else None)
    assert (r.cpuid_mod_id, r.cpuid_step) == ((1, 2) if version >= 3 else (None, None))
    assert (r.launch_mit_vector, r.current_mit_vector) == ((0x1122, 0x3344) if version >= 5 else (None, None))
    assert r.signature_r == int.from_bytes(fill(48, 11), "little")
    assert r.signature_s == int.from_bytes(fill(48, 12), "little")
    assert r.signed_data == data[:0x2A0]
    assert r.debug


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode_report(1), "unsupported SEV-SNP report version 1"),
        (encode_report(4), "unsupported SEV-SNP report version 4"),
        (encode_report(sig_algo=2), "unsupported SEV-SNP signature algorithm 2"),
        (encode_report(3, cpuid_family=0x1A), "Turin"),
        (encode_report()[:0x2D0] + b"\x01" + encode_report()[0x2D1:], "wider than 384 bits"),
        (encode_report()[:0x49F] + b"\x01", "reserved area after the signature"),
        (encode_report()[:-1], "1184 bytes, got 1183"),
        (b"", "1184 bytes, got 0"),
    ],
)
def test_malformed_report_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        parse_snp_report(data)


@settings(max_examples=300)
@given(
    data=st.binary(min_size=0x4A0, max_size=0x4A0),
    version=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 0x02000000]),
    algo=st.sampled_from([0, 1, 2]),
    zero_tail=st.booleans(),
    narrow_signature=st.booleans(),
)
def test_only_well_formed_reports_parse(
    data: bytes, version: int, algo: int, zero_tail: bool, narrow_signature: bool
) -> None:
    report = bytearray(data)
    struct.pack_into("<I", report, 0, version)
    struct.pack_into("<I", report, 0x34, algo)
    if narrow_signature:
        report[0x2D0:0x2E8] = report[0x318:0x330] = bytes(24)
    if zero_tail:
        report[0x330:] = bytes(0x4A0 - 0x330)
    well_formed = (
        version in (2, 3, 5)
        and algo == 1
        and zero_tail
        and narrow_signature
        and (version == 2 or report[0x188] != 0x1A)
    )
    try:
        parsed = parse_snp_report(bytes(report))
    except VerificationError:
        assert not well_formed
    else:
        assert well_formed
        assert parsed.signed_data == bytes(report[:0x2A0])


@settings(max_examples=100)
@given(body=st.binary(min_size=0x2A0 - 0x38, max_size=0x2A0 - 0x38), r=st.binary(min_size=48, max_size=48))
def test_random_report_bodies_parse_consistently(body: bytes, r: bytes) -> None:
    data = struct.pack("<IIQ", 2, 0, 0) + bytes(0x20) + struct.pack("<II", 0, 1) + body
    data += r + bytes(24) + r + bytes(24) + bytes(0x4A0 - 0x330)
    report = parse_snp_report(data)
    assert report.measurement == data[0x90:0xC0]
    assert report.chip_id == data[0x1A0:0x1E0]
    assert report.signature_r == report.signature_s == int.from_bytes(r, "little")


# --- certificate table ---------------------------------------------------------------------

certs = st.binary(min_size=1, max_size=300)


@given(vcek=certs, ask=st.none() | certs, ark=st.none() | certs, padding=st.integers(0, 64))
def test_cert_table_round_trip(vcek: bytes, ask: bytes | None, ark: bytes | None, padding: int) -> None:
    table = build_snp_cert_table(vcek, ask, ark) + bytes(padding)  # hosts pad to a page
    assert parse_snp_cert_table(table) == SnpCertificates(vcek=vcek, ask=ask, ark=ark)


def entry(guid: uuid.UUID, offset: int, length: int) -> bytes:
    return guid.bytes + struct.pack("<II", offset, length)


def test_cert_table_layout_is_guid_offset_length_then_zero_entry() -> None:
    table = build_snp_cert_table(b"V" * 3, b"S" * 2, b"R")
    expected = entry(VCEK_GUID, 96, 3) + entry(ASK_GUID, 99, 2) + entry(ARK_GUID, 101, 1) + bytes(24)
    assert table == expected + b"VVVSSR"
    assert VCEK_GUID.bytes.hex().startswith("63da758de664")


def test_cert_table_skips_unknown_guids() -> None:
    other = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")
    table = entry(other, 72, 2) + entry(VCEK_GUID, 74, 1) + bytes(24) + b"xxV"
    assert parse_snp_cert_table(table) == SnpCertificates(vcek=b"V")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (entry(VCEK_GUID, 48, 1) + b"V", "no all-zero terminator"),
        (entry(VCEK_GUID, 48, 5) + bytes(24) + b"V", "outside the data area"),
        (entry(VCEK_GUID, 0, 24) + bytes(24), "outside the data area"),
        (entry(VCEK_GUID, 48, 0) + bytes(24), "outside the data area"),
        (entry(VCEK_GUID, 72, 1) + entry(VCEK_GUID, 72, 1) + bytes(24) + b"V", "more than one VCEK"),
        (b"\x01" * 23, "no all-zero terminator"),
    ],
)
def test_malformed_cert_table_is_rejected(table: bytes, message: str) -> None:
    with pytest.raises(CollateralError, match=message):
        parse_snp_cert_table(table)


def test_empty_certificate_cannot_be_tabled() -> None:
    with pytest.raises(ConfigurationError):
        build_snp_cert_table(b"")


# --- aux decoding --------------------------------------------------------------------------

VCEK_DER = (SNP / "gsg_milan.vcek.der").read_bytes()
CHAIN_PEM = (SNP / "ask_ark_milan.pem").read_bytes()
ASK, ARK = x509.load_pem_x509_certificates(CHAIN_PEM)
ASK_DER, ARK_DER = ASK.public_bytes(Encoding.DER), ARK.public_bytes(Encoding.DER)


def test_aux_forms_all_decode_to_the_same_certificates() -> None:
    expected = SnpCertificates(vcek=VCEK_DER, ask=ASK_DER, ark=ARK_DER)
    assert parse_snp_aux(build_snp_cert_table(VCEK_DER, ASK_DER, ARK_DER)) == expected
    assert parse_snp_aux(ARK_DER + VCEK_DER + ASK_DER) == expected
    assert parse_snp_aux(CHAIN_PEM) == SnpCertificates(ask=ASK_DER, ark=ARK_DER)
    assert parse_snp_aux(b"") == SnpCertificates()


def test_vlek_is_told_apart_from_vcek() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "SEV-VLEK")])
    vlek = (
        x509.CertificateBuilder(subject_name=name, issuer_name=name, public_key=key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2025, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA384())
        .public_bytes(Encoding.DER)
    )
    assert parse_snp_aux(vlek + VCEK_DER) == SnpCertificates(vcek=VCEK_DER, vlek=vlek)


@pytest.mark.parametrize(
    ("aux", "message"),
    [
        (VCEK_DER + VCEK_DER, "more than one VCEK"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "PEM"),
        (b"\x30\x03\x02\x01\x00", "not a valid X.509 certificate"),
        (b"garbage that is neither", "terminator"),
    ],
)
def test_malformed_aux_is_rejected(aux: bytes, message: str) -> None:
    with pytest.raises(CollateralError, match=message):
        parse_snp_aux(aux)


def test_split_der_sequences() -> None:
    assert split_der_sequences(b"\x30\x01\x00\x30\x00") == [b"\x30\x01\x00", b"\x30\x00"]
    assert split_der_sequences(b"\x30\x82\x00\x01\x00") == [b"\x30\x82\x00\x01\x00"]
    for blob in (b"", b"\x31\x00", b"\x30\x05\x00", b"\x30\x80", b"\x30\x85\x00\x00\x00\x00\x00", b"\x30"):
        assert split_der_sequences(blob) is None


@pytest.mark.parametrize(
    ("der", "value"), [("020100", 0), ("020144", 68), ("020200c8", 200), ("02017f", 127)]
)
def test_der_small_uint(der: str, value: int) -> None:
    assert der_small_uint(bytes.fromhex(der), "snp") == value


@pytest.mark.parametrize(
    "der", ["0201", "020180", "02020005", "040105", "02020100", "0202000100", "020300ffff"]
)
def test_der_small_uint_rejects_anything_else(der: str) -> None:
    with pytest.raises(CollateralError):
        der_small_uint(bytes.fromhex(der), "snp")


# --- verifier configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ask_ark_pem": b"not pem"}, "not a PEM certificate chain"),
        ({"ask_ark_pem": ASK.public_bytes(Encoding.PEM)}, "one self-signed ARK"),
        ({"ask_ark_pem": CHAIN_PEM + ASK.public_bytes(Encoding.PEM)}, "at most one ASK"),
        ({"vcek": b"\x30\x00"}, "configured VCEK is not a valid X.509"),
        ({"vcek": ASK_DER}, "ECDSA P-384"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, bytes], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SnpVerifier(**kwargs)  # type: ignore[arg-type]


def test_builtin_anchor_is_the_amd_milan_chain() -> None:
    assert SnpVerifier()._ark_der == ARK_DER
    assert SnpVerifier(ask_ark_pem=ARK.public_bytes(Encoding.PEM))._ask is None
