"""Evidence decoding: envelope round trip, raw artefact detection, clear errors on garbage."""

from __future__ import annotations

import pytest

from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import ConfigurationError, EvidenceError
from tests.conftest import VECTORS


@pytest.mark.parametrize(
    ("path", "tee"),
    [
        ("sgx/phala_sgx_v3.quote.bin", TeeType.SGX),
        ("tdx/phala_tdx_v4.quote.bin", TeeType.TDX),
        ("tdx/phala_near_tdx_v4.quote.hex", TeeType.TDX),
        ("tdx/phala_tdx_v5_outdated.quote.bin", TeeType.TDX),
        ("sev-snp/gsg_milan.report.bin", TeeType.SEV_SNP),
        ("sev-snp/virtee_milan.report.hex", TeeType.SEV_SNP),
    ],
)
def test_raw_artefacts_are_detected(path: str, tee: TeeType) -> None:
    evidence = Evidence.from_bytes((VECTORS / path).read_bytes())
    assert evidence.tee is tee
    assert Evidence.from_bytes(evidence.to_bytes()) == evidence


def test_envelope_round_trip_with_aux() -> None:
    evidence = Evidence(TeeType.SEV_SNP, b"report", b"certs")
    assert Evidence.from_bytes(evidence.to_bytes()) == evidence
    assert "report" not in repr(evidence)


@pytest.mark.parametrize(
    "blob", [b"", b"garbage", b"\xa1\x61v\x02", b"\xa3\x61v\x01\x63tee\x64nope\x64data\x41x"]
)
def test_garbage_is_an_evidence_error(blob: bytes) -> None:
    with pytest.raises(EvidenceError):
        Evidence.from_bytes(blob)


def test_an_envelope_followed_by_other_bytes_is_an_evidence_error() -> None:
    envelope = Evidence(TeeType.SEV_SNP, b"report", b"certs").to_bytes()
    with pytest.raises(EvidenceError):
        Evidence.from_bytes(envelope + b"\x00")


def test_unknown_tee_type_in_constructor() -> None:
    with pytest.raises(ConfigurationError):
        Evidence("sgx", b"x")  # type: ignore[arg-type]
