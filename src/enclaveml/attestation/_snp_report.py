"""The AMD SEV-SNP wire formats: the attestation report and the certificate table.

This module only decodes and encodes bytes; it checks no signature (that is
:mod:`enclaveml.attestation._snp`). It also holds the two bits of DER framing the verifier
needs: splitting concatenated DER certificates, and AMD's one-byte INTEGER extensions.
Everything here is from the SEV-SNP Firmware ABI specification (AMD 56860,
``ATTESTATION_REPORT``) and the GHCB specification (AMD 56421, extended guest request
certificate table).

Attestation report (0x4A0 = 1184 bytes, all integers little-endian)::

    0x000  u32       VERSION            2, 3 or 5
    0x004  u32       GUEST_SVN
    0x008  u64       POLICY             bit 16 SMT, 17 reserved (1), 18 MIGRATE_MA, 19 DEBUG,
                                        20 SINGLE_SOCKET; bits 0-15 minimum ABI minor/major
    0x010  16 bytes  FAMILY_ID
    0x020  16 bytes  IMAGE_ID
    0x030  u32       VMPL
    0x034  u32       SIGNATURE_ALGO     1 = ECDSA P-384 with SHA-384 (the only one defined)
    0x038  8 bytes   CURRENT_TCB        TCB_VERSION, see below
    0x040  u64       PLATFORM_INFO      bit 0 SMT enabled, bit 1 TSME enabled, ...
    0x048  u32       flags              bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY,
                                        bits 2-4 SIGNING_KEY (0 VCEK, 1 VLEK, 7 none)
    0x04C  u32       reserved
    0x050  64 bytes  REPORT_DATA        guest-supplied data (nonce, key digest)
    0x090  48 bytes  MEASUREMENT        launch digest of the guest
    0x0C0  32 bytes  HOST_DATA
    0x0E0  48 bytes  ID_KEY_DIGEST      SHA-384 of the ID block signing key
    0x110  48 bytes  AUTHOR_KEY_DIGEST
    0x140  32 bytes  REPORT_ID
    0x160  32 bytes  REPORT_ID_MA       migration agent's report ID
    0x180  8 bytes   REPORTED_TCB       the TCB the VCEK was derived from
    0x188  u8 x 3    CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (version >= 3; reserved in 2)
    0x18B  21 bytes  reserved
    0x1A0  64 bytes  CHIP_ID            equals the VCEK's hwID extension (zero if masked)
    0x1E0  8 bytes   COMMITTED_TCB
    0x1E8  u8 x 3    CURRENT_BUILD, CURRENT_MINOR, CURRENT_MAJOR (firmware version)
    0x1EB  u8        reserved
    0x1EC  u8 x 3    COMMITTED_BUILD, COMMITTED_MINOR, COMMITTED_MAJOR
    0x1EF  u8        reserved
    0x1F0  8 bytes   LAUNCH_TCB
    0x1F8  u64       LAUNCH_MIT_VECTOR  (version >= 5; reserved before)
    0x200  u64       CURRENT_MIT_VECTOR (version >= 5; reserved before)
    0x208  152 bytes reserved
    ----- everything above, [0x000, 0x2A0), is what the signature covers -----
    0x2A0  72 bytes  SIGNATURE.R        little-endian; only the low 48 bytes may be non-zero
    0x2E8  72 bytes  SIGNATURE.S        likewise
    0x330  368 bytes reserved, must be zero (it is not signed, so we refuse anything there)

TCB_VERSION (Milan and Genoa layout), 8 bytes: byte 0 boot loader SVN, byte 1 TEE SVN,
bytes 2-5 reserved, byte 6 SNP firmware SVN, byte 7 microcode SVN. Turin (CPUID family
0x1A) uses another layout; reports that say they come from Turin are refused rather than
misread.

Certificate table (the configfs-tsm ``auxblob`` / extended guest request data pages)::

    entry[i], 24 bytes each:  16 bytes GUID (RFC 4122 byte order) | u32 offset | u32 length
    an all-zero entry terminates the list
    certificate bytes (DER) at [offset, offset + length), offsets counted from the table start

GUIDs: VCEK 63da758d-e664-4564-adc5-f4b93be8accd, VLEK a8074bc2-a25a-483e-aae6-39c045a0b8a1,
ASK 4ab7b379-bbac-4fe4-a02f-05aef327c782, ARK c0b406a4-a803-4952-9743-3fb6014cd0ae. Entries
with other GUIDs are skipped; the data area may be followed by zero padding (page size).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from enclaveml.attestation.claims import SnpTcb
from enclaveml.errors import CollateralError, ConfigurationError, VerificationError

__all__ = [
    "ARK_GUID",
    "ASK_GUID",
    "SIGNED_LENGTH",
    "SNP_REPORT_SIZE",
    "SUPPORTED_REPORT_VERSIONS",
    "VCEK_GUID",
    "VLEK_GUID",
    "SnpCertificates",
    "SnpReport",
    "build_snp_cert_table",
    "der_small_uint",
    "parse_snp_cert_table",
    "parse_snp_report",
    "split_der_sequences",
    "tcb_from_bytes",
]

SNP_REPORT_SIZE = 0x4A0
SIGNED_LENGTH = 0x2A0
SUPPORTED_REPORT_VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
SIGNING_KEY_NONE = 7
POLICY_DEBUG_BIT = 19

_SIG_R = 0x2A0
_SIG_S = 0x2E8
_SIG_COMPONENT = 72
_SIG_END = 0x330
# P-384 scalars are 48 bytes; the upper 24 bytes of each 72-byte field are always zero.
_P384_BYTES = 48
_CPUID_FAMILY_TURIN = 0x1A

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_ENTRY = struct.Struct("<16sII")


@dataclass(frozen=True, slots=True)
class SnpReport:
    """Every field of a parsed (not yet verified) SEV-SNP attestation report."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: SnpTcb
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: SnpTcb
    reported_tcb_raw: bytes
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: SnpTcb
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: SnpTcb
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    signed_data: bytes

    @property
    def debug(self) -> bool:
        """Policy bit 19: the host may decrypt and inspect the guest."""
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def author_key_en(self) -> bool:
        return bool(self.flags & 1)

    @property
    def mask_chip_key(self) -> bool:
        """True when the host masked CHIP_ID (it is then all zeros)."""
        return bool(self.flags >> 1 & 1)

    @property
    def signing_key(self) -> int:
        """Which key signed the report: 0 VCEK, 1 VLEK, 7 none."""
        return self.flags >> 2 & 0b111


def tcb_from_bytes(raw: bytes) -> SnpTcb:
    """Decode an 8-byte TCB_VERSION in the Milan/Genoa layout."""
    if len(raw) != 8:
        raise VerificationError(f"an SEV-SNP TCB version is 8 bytes, got {len(raw)}")
    return SnpTcb(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])


def parse_snp_report(data: bytes) -> SnpReport:
    """Decode a raw SEV-SNP attestation report; raise VerificationError if it is malformed."""
    data = bytes(data)
    if len(data) != SNP_REPORT_SIZE:
        raise VerificationError(
            f"an SEV-SNP attestation report is {SNP_REPORT_SIZE} bytes, got {len(data)} "
            "(pass the raw report, not hex text or the extended report with certificates)"
        )
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x000)
    if version not in SUPPORTED_REPORT_VERSIONS:
        raise VerificationError(
            f"unsupported SEV-SNP report version {version} (supported: {SUPPORTED_REPORT_VERSIONS})"
        )
    vmpl, signature_algo = struct.unpack_from("<II", data, 0x030)
    if signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError(
            f"unsupported SEV-SNP signature algorithm {signature_algo} (only 1, ECDSA P-384/SHA-384)"
        )
    platform_info, flags = struct.unpack_from("<QI", data, 0x040)
    cpuid: tuple[int | None, int | None, int | None] = (None, None, None)
    if version >= 3:
        cpuid = (data[0x188], data[0x189], data[0x18A])
        if cpuid[0] == _CPUID_FAMILY_TURIN:
            raise VerificationError(
                "SEV-SNP report comes from an AMD Turin CPU (CPUID family 0x1A), whose TCB layout "
                "enclaveml does not decode yet"
            )
    mit: tuple[int | None, int | None] = (None, None)
    if version >= 5:
        mit = struct.unpack_from("<QQ", data, 0x1F8)
    r_field = data[_SIG_R : _SIG_R + _SIG_COMPONENT]
    s_field = data[_SIG_S : _SIG_S + _SIG_COMPONENT]
    if any(r_field[_P384_BYTES:]) or any(s_field[_P384_BYTES:]):
        raise VerificationError("SEV-SNP report signature component is wider than 384 bits")
    if any(data[_SIG_END:]):
        raise VerificationError("SEV-SNP report has non-zero bytes in the reserved area after the signature")
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x010:0x020],
        image_id=data[0x020:0x030],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb_from_bytes(data[0x038:0x040]),
        platform_info=platform_info,
        flags=flags,
        report_data=data[0x050:0x090],
        measurement=data[0x090:0x0C0],
        host_data=data[0x0C0:0x0E0],
        id_key_digest=data[0x0E0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=tcb_from_bytes(data[0x180:0x188]),
        reported_tcb_raw=data[0x180:0x188],
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=tcb_from_bytes(data[0x1E0:0x1E8]),
        current_build=data[0x1E8],
        current_minor=data[0x1E9],
        current_major=data[0x1EA],
        committed_build=data[0x1EC],
        committed_minor=data[0x1ED],
        committed_major=data[0x1EE],
        launch_tcb=tcb_from_bytes(data[0x1F0:0x1F8]),
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
        signature_r=int.from_bytes(r_field, "little"),
        signature_s=int.from_bytes(s_field, "little"),
        signed_data=data[:SIGNED_LENGTH],
    )


@dataclass(frozen=True, slots=True)
class SnpCertificates:
    """The certificates carried beside a report, each as it was found (normally DER)."""

    vcek: bytes | None = None
    vlek: bytes | None = None
    ask: bytes | None = None
    ark: bytes | None = None


_KIND_BY_GUID = {VCEK_GUID: "vcek", VLEK_GUID: "vlek", ASK_GUID: "ask", ARK_GUID: "ark"}


def parse_snp_cert_table(table: bytes) -> SnpCertificates:
    """Decode a certificate table; raise CollateralError if it is malformed.

    Unknown GUIDs are skipped; a known GUID appearing twice is refused, since picking one
    silently would let a host choose which certificate gets checked.
    """
    table = bytes(table)
    found: dict[str, bytes] = {}
    header_end: int | None = None
    entries: list[tuple[uuid.UUID, int, int]] = []
    for pos in range(0, len(table) - _ENTRY.size + 1, _ENTRY.size):
        raw_guid, offset, length = _ENTRY.unpack_from(table, pos)
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            header_end = pos + _ENTRY.size
            break
        entries.append((uuid.UUID(bytes=raw_guid), offset, length))
    if header_end is None:
        raise CollateralError(
            "SEV-SNP certificate table is truncated or not a certificate table (no all-zero terminator)"
        )
    for index, (guid, offset, length) in enumerate(entries):
        if length == 0 or offset < header_end or offset + length > len(table):
            raise CollateralError(
                f"SEV-SNP certificate table entry {index} ({guid}) points outside the data area: "
                f"offset {offset}, length {length}, table size {len(table)}"
            )
        kind = _KIND_BY_GUID.get(guid)
        if kind is None:
            continue
        if kind in found:
            raise CollateralError(f"SEV-SNP certificate table holds more than one {kind.upper()} certificate")
        found[kind] = table[offset : offset + length]
    return SnpCertificates(**found)


def build_snp_cert_table(
    vcek_der: bytes, ask_der: bytes | None = None, ark_der: bytes | None = None
) -> bytes:
    """Encode certificates as a certificate table (VCEK, then ASK, then ARK when given)."""
    certs = [(VCEK_GUID, vcek_der), (ASK_GUID, ask_der), (ARK_GUID, ark_der)]
    present = [(guid, bytes(der)) for guid, der in certs if der is not None]
    for guid, der in present:
        if not der:
            raise ConfigurationError(f"certificate for {guid} is empty")
    cursor = _ENTRY.size * (len(present) + 1)
    header = bytearray()
    for guid, der in present:
        header += _ENTRY.pack(guid.bytes, cursor, len(der))
        cursor += len(der)
    header += bytes(_ENTRY.size)
    return bytes(header) + b"".join(der for _, der in present)


def split_der_sequences(blob: bytes) -> list[bytes] | None:
    """Split concatenated DER SEQUENCEs; None when ``blob`` is not exactly that."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if blob[pos] != 0x30 or pos + 2 > len(blob):
            return None
        first = blob[pos + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            size = first & 0x7F
            if not 1 <= size <= 4 or pos + 2 + size > len(blob):
                return None
            header, length = 2 + size, int.from_bytes(blob[pos + 2 : pos + 2 + size], "big")
        end = pos + header + length
        if end > len(blob):
            return None
        parts.append(blob[pos:end])
        pos = end
    return parts or None


def der_small_uint(value: bytes, what: str) -> int:
    """Decode the DER INTEGER AMD uses for each VCEK TCB component (one SVN, 0..255)."""
    body = value[2:]
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(body) or len(body) > 2:
        raise CollateralError(f"VCEK {what} extension is not a small DER INTEGER: {value.hex()}")
    if body[0] & 0x80 or (len(body) == 2 and (body[0] != 0 or not body[1] & 0x80)):
        raise CollateralError(f"VCEK {what} extension is a negative or non-minimal INTEGER: {value.hex()}")
    return int.from_bytes(body, "big")
