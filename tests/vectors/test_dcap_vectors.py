"""DcapVerifier against real SGX/TDX quotes and Intel collateral (tests/vectors/data/README.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dcap_qvl  # type: ignore[import-untyped, unused-ignore]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaveml.attestation._collateral import Collateral, LocalCollateral
from enclaveml.attestation._dcap import DcapVerifier, _claims
from enclaveml.attestation._policy_rules import TCB_STATUSES, TcbStatus
from enclaveml.attestation.claims import SgxClaims, TdxClaims
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.attestation.verifier import EvidenceVerifier, Verifier
from enclaveml.errors import (
    CollateralError,
    CollateralExpiredError,
    ConfigurationError,
    PolicyRejectedError,
    VerificationError,
)
from tests.vectors._dcap_helpers import (
    EXPECTED,
    REJECTED_CASES,
    VERIFIED_CASES,
    case_dir,
    collateral_path,
    flip,
    now_for,
    quote_bytes,
    quote_file_bytes,
    regions,
    unix,
    verifier_for,
)

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _verify(name: str, data: bytes | None = None, now: int | datetime | None = None) -> SgxClaims | TdxClaims:
    tee = TeeType.SGX if EXPECTED[name]["quote_type"] == "SGX" else TeeType.TDX
    evidence = Evidence(tee, quote_bytes(name) if data is None else data)
    return verifier_for(name).verify(evidence, now=now_for(name) if now is None else now)


def _expected_expiry(name: str) -> datetime:
    # JSON items are valid through nextUpdate; a CRL only until the second before its nextUpdate.
    validity = EXPECTED[name]["collateral_validity"]
    ends = [unix(validity[k][1]) for k in ("tcb_info", "qe_identity")]
    ends += [unix(validity[k][1]) - 1 for k in ("pck_crl", "root_ca_crl")]
    return datetime.fromtimestamp(min(ends), tz=UTC)


@pytest.mark.parametrize("name", VERIFIED_CASES)
def test_vector_verifies_to_expected_claims(name: str) -> None:
    case = EXPECTED[name]
    expected, report = case["expected"], case["report"]
    # Evidence.from_bytes takes the file as stored (binary, or hex text for the NEAR quote).
    evidence = Evidence.from_bytes(quote_file_bytes(name))
    claims = verifier_for(name).verify(evidence, now=now_for(name))

    assert claims.tcb_status == expected["status"]
    assert claims.advisory_ids == tuple(expected["advisory_ids"])
    assert claims.qe_tcb_status == expected["qe_status"]["status"]
    assert claims.platform_tcb_status == expected["platform_status"]["status"]
    assert claims.fmspc == case["fmspc"]
    assert claims.quote_version == case["quote_version"]
    assert claims.report_data == bytes.fromhex(report["report_data"])
    assert claims.debug is False
    assert claims.collateral_expiry == _expected_expiry(name)
    if case["quote_type"] == "SGX":
        assert isinstance(claims, SgxClaims)
        assert claims.tee is TeeType.SGX
        assert claims.mrenclave == claims.measurement == bytes.fromhex(report["mr_enclave"])
        assert claims.mrsigner == bytes.fromhex(report["mr_signer"])
        assert claims.attributes == bytes.fromhex(report["attributes"])
        assert claims.cpu_svn == bytes.fromhex(report["cpu_svn"])
        assert (claims.isv_prod_id, claims.isv_svn) == (0, 0)  # README: isv_prod_id 0, isv_svn 0
    else:
        assert isinstance(claims, TdxClaims)
        assert claims.tee is TeeType.TDX
        assert claims.mrtd == claims.measurement == bytes.fromhex(report["mr_td"])
        assert claims.rtmr == tuple(bytes.fromhex(report[f"rt_mr{i}"]) for i in range(4))
        for field in ("mr_config_id", "mr_owner", "mr_owner_config", "mr_seam", "td_attributes", "xfam"):
            assert getattr(claims, field) == bytes.fromhex(report[field]), field
        assert claims.tee_tcb_svn == bytes.fromhex(report["tee_tcb_svn"])
    assert json.dumps(claims.to_dict())  # claims stay JSON-ready


def test_sgx_measurements_match_readme_literals() -> None:
    # Pinned independently of expected.json, from the README text.
    claims = _verify("sgx/phala_sgx_v3")
    assert claims.measurement.hex() == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert claims.report_data == b"Hello, world!" + bytes(51)


@pytest.mark.parametrize("name", [n for n in VERIFIED_CASES if EXPECTED[n]["expected"]["advisory_ids"]])
def test_a_rejected_advisory_rejects_the_real_quote_however_it_is_spelt(name: str) -> None:
    """dcap-qvl reports INTEL-SA-NNNNN; a policy written in another case used to reject nothing."""
    claims = _verify(name)
    assert {claims.tcb_status, claims.qe_tcb_status, claims.platform_tcb_status} <= set(TCB_STATUSES)
    TcbStatus(accepted=[claims.tcb_status]).check(claims)
    advisory = claims.advisory_ids[-1]
    for spelling in (advisory, advisory.lower(), f" {advisory.title()} "):
        with pytest.raises(PolicyRejectedError, match=advisory):
            TcbStatus(accepted=[claims.tcb_status], rejected_advisories=[spelling]).check(claims)


@pytest.mark.parametrize("name", VERIFIED_CASES)
def test_claims_name_the_tcb_evaluation_and_policies_can_require_a_minimum(name: str) -> None:
    collateral = json.loads(collateral_path(name).read_text())
    number = json.loads(collateral["tcb_info"])["tcbEvaluationDataNumber"]
    claims = _verify(name)
    assert claims.tcb_evaluation_data_number == number
    assert claims.to_dict()["tcb_evaluation_data_number"] == number
    status = [claims.tcb_status]
    TcbStatus(accepted=status, min_evaluation_data_number=number).check(claims)
    with pytest.raises(PolicyRejectedError, match=f"TCB evaluation >= {number + 1}") as refused:
        TcbStatus(accepted=status, min_evaluation_data_number=number + 1).check(claims)
    assert refused.value.observed == f"collateral of TCB evaluation {number}"


def test_datetime_now_is_accepted() -> None:
    when = datetime.fromtimestamp(now_for("tdx/phala_tdx_v4"), tz=UTC)
    assert _verify("tdx/phala_tdx_v4", now=when).tcb_status == "UpToDate"


@pytest.mark.parametrize("name", REJECTED_CASES)
def test_v5_outdated_quote_is_rejected_for_its_tcb_level(name: str) -> None:
    assert EXPECTED[name]["quote_version"] == 5
    with pytest.raises(VerificationError, match="No matching TCB level found") as info:
        _verify(name)
    assert not isinstance(info.value, CollateralError)
    assert isinstance(info.value.__cause__, ValueError)


# -- tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", VERIFIED_CASES)
def test_every_signed_byte_is_tamper_evident(name: str) -> None:
    quote = quote_bytes(name)
    offsets = regions(quote).tamper_evident()
    assert len(offsets) >= 48 + 384 + 64 + 64 + 384 + 64
    accepted = []
    for offset in offsets:
        try:
            _verify(name, flip(quote, offset))
        except VerificationError:
            continue
        accepted.append(offset)
    assert accepted == []


@pytest.mark.parametrize("name", VERIFIED_CASES)
@SLOW
@given(data=st.data())
def test_pck_leaf_certificate_bytes_are_tamper_evident(name: str, data: st.DataObject) -> None:
    quote = quote_bytes(name)
    leaf = [i for i in regions(quote).pck_leaf if quote[i] != ord("\n")]  # "\n" -> "\v" is still whitespace
    offset = data.draw(st.sampled_from(leaf), label="offset")
    mask = data.draw(st.sampled_from([0x01, 0x02, 0x20, 0x80]), label="mask")
    with pytest.raises(VerificationError):
        _verify(name, flip(quote, offset, mask))


def test_embedded_root_copy_is_not_what_we_trust() -> None:
    # Documented dcap-qvl behaviour (README "Tamper checks"): the root CA copy inside the quote
    # is ignored in favour of the built-in Intel root, so damaging it changes nothing. This
    # also shows the tamper harness above does detect a flip that verifies.
    name = "sgx/phala_sgx_v3"
    quote = quote_bytes(name)
    root_copy = quote.rindex(b"-----BEGIN CERTIFICATE-----")
    assert root_copy > regions(quote).pck_leaf.stop
    offset = root_copy + 200
    assert quote[offset] != ord("\n")
    assert _verify(name, flip(quote, offset)).tcb_status == "ConfigurationAndSWHardeningNeeded"


@pytest.mark.parametrize("name", VERIFIED_CASES)
def test_zero_padding_is_tolerated_but_nonzero_padding_rejected(name: str) -> None:
    quote = quote_bytes(name)
    signed = regions(quote).signed_length
    assert _verify(name, quote[:signed] + bytes(100)).tcb_status == EXPECTED[name]["expected"]["status"]
    assert _verify(name, quote[:signed]).tcb_status == EXPECTED[name]["expected"]["status"]
    with pytest.raises(VerificationError, match="non-zero bytes after its signed length"):
        _verify(name, quote[:signed] + b"\x00\x01")


@SLOW
@given(cut=st.integers(min_value=0, max_value=4599))
def test_truncated_quote_is_rejected(cut: int) -> None:
    name = "sgx/phala_sgx_v3"
    with pytest.raises(VerificationError):
        _verify(name, quote_bytes(name)[: max(cut, 1)])


@SLOW
@given(tail=st.binary(min_size=1, max_size=600))
def test_arbitrary_bytes_after_a_header_are_rejected(tail: bytes) -> None:
    header = quote_bytes("tdx/phala_tdx_v4")[:48]
    with pytest.raises(VerificationError):
        _verify("tdx/phala_tdx_v4", header + tail)


def test_tee_label_must_match_quote() -> None:
    verifier = verifier_for("sgx/phala_sgx_v3")
    with pytest.raises(VerificationError, match="labelled tdx"):
        verifier.verify(
            Evidence(TeeType.TDX, quote_bytes("sgx/phala_sgx_v3")), now=now_for("sgx/phala_sgx_v3")
        )


@pytest.mark.parametrize("tee", [TeeType.SEV_SNP, TeeType.SIMULATION])
def test_non_dcap_evidence_is_rejected(tee: TeeType) -> None:
    with pytest.raises(VerificationError, match=f"not {tee.value} evidence"):
        verifier_for("sgx/phala_sgx_v3").verify(
            Evidence(tee, b"\x02" * 1184), now=now_for("sgx/phala_sgx_v3")
        )


# -- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*VERIFIED_CASES, *REJECTED_CASES])
def test_outside_collateral_window_raises_collateral_expired(name: str) -> None:
    start, end = EXPECTED[name]["valid_window_unix"]
    with pytest.raises(CollateralExpiredError, match=r"collateral not valid at \S+Z: \w+ valid") as before:
        _verify(name, now=start - 1)
    assert "issueDate" not in str(before.value)  # names the item and its window, in our words
    with pytest.raises(CollateralExpiredError, match=r"collateral not valid at \S+Z: \w+ valid"):
        _verify(name, now=end + 2)  # README windows are conservative by one second at the end
    with pytest.raises(CollateralExpiredError, match="tcb_info valid"):
        _verify(name, now=datetime.fromtimestamp(start, tz=UTC) - timedelta(days=365))


@SLOW
@given(now=st.integers(min_value=0, max_value=2**64))
def test_any_time_either_verifies_or_is_outside_the_window(now: int) -> None:
    name = "tdx/phala_tdx_v4"
    start, end = EXPECTED[name]["valid_window_unix"]
    if start <= now <= end:
        assert _verify(name, now=now).tcb_status == "UpToDate"
    else:
        with pytest.raises(CollateralExpiredError, match="collateral not valid at"):
            _verify(name, now=now)


def _boundaries() -> list[tuple[str, int]]:
    out = []
    for name in VERIFIED_CASES:
        validity = EXPECTED[name]["collateral_validity"]
        for item, (first, last) in validity.items():
            edges = [unix(last)] if item.endswith("crl") else [unix(first), unix(last)]
            out += [(name, edge + delta) for edge in edges for delta in (-2, -1, 0, 1, 2)]
    return out


@pytest.mark.parametrize(("name", "now"), _boundaries())
def test_window_edges_match_dcap_qvl(name: str, now: int) -> None:
    coll = dcap_qvl.QuoteCollateralV3.from_json(collateral_path(name).read_text())
    try:
        dcap_qvl.verify(quote_bytes(name), coll, now)
        bare_ok = True
    except ValueError:
        bare_ok = False
    if bare_ok:
        assert _verify(name, now=now).tcb_status == EXPECTED[name]["expected"]["status"]
    else:
        with pytest.raises(CollateralExpiredError):
            _verify(name, now=now)


# -- collateral selection and trust anchor -----------------------------------------------------


def test_directory_source_serves_every_tdx_quote_with_one_verifier() -> None:
    verifier = DcapVerifier(LocalCollateral(case_dir("tdx/phala_tdx_v4")))
    names = [n for n in VERIFIED_CASES if n.startswith("tdx/")] * 2  # second round hits the PCK cache
    for name in names:
        claims = verifier.verify(Evidence(TeeType.TDX, quote_bytes(name)), now=now_for(name))
        assert (claims.fmspc, claims.tcb_status) == (
            EXPECTED[name]["fmspc"],
            EXPECTED[name]["expected"]["status"],
        )
    dispatcher = EvidenceVerifier(dcap=verifier)
    assert isinstance(verifier, Verifier)
    assert (
        dispatcher.verify(Evidence(TeeType.TDX, quote_bytes(names[0])), now=now_for(names[0])).tee
        is TeeType.TDX
    )


def test_collateral_for_another_platform_is_refused() -> None:
    class WrongSource:
        def get(self, *, tee: TeeType, fmspc: str, ca: str, now: int) -> Collateral:
            return Collateral.from_json(collateral_path("tdx/automata_tdx_v4").read_text())

    verifier = DcapVerifier(WrongSource())
    with pytest.raises(CollateralError, match="quote needs tdx/B0C06F000000/platform"):
        verifier.verify(
            Evidence(TeeType.TDX, quote_bytes("tdx/phala_tdx_v4")), now=now_for("tdx/phala_tdx_v4")
        )


def test_missing_collateral_names_the_platform() -> None:
    verifier = DcapVerifier(LocalCollateral(collateral_path("tdx/phala_tdx_v4")))
    with pytest.raises(CollateralError, match="no DCAP collateral for sgx FMSPC 00A067110000"):
        verifier.verify(
            Evidence(TeeType.SGX, quote_bytes("sgx/phala_sgx_v3")), now=now_for("sgx/phala_sgx_v3")
        )


def _chain_der(name: str) -> list[bytes]:
    pem = json.loads(collateral_path(name).read_text())["tcb_info_issuer_chain"].encode()
    return [cert.public_bytes(Encoding.DER) for cert in x509.load_pem_x509_certificates(pem)]


def test_explicit_intel_root_verifies_and_another_root_does_not() -> None:
    name = "sgx/phala_sgx_v3"
    tcb_signing, intel_root = _chain_der(name)
    source = LocalCollateral(collateral_path(name))
    evidence = Evidence(TeeType.SGX, quote_bytes(name))
    claims = DcapVerifier(source, root_ca_der=intel_root).verify(evidence, now=now_for(name))
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(VerificationError) as info:
        DcapVerifier(source, root_ca_der=tcb_signing).verify(evidence, now=now_for(name))
    assert not isinstance(info.value, CollateralExpiredError)
    with pytest.raises(ConfigurationError):
        DcapVerifier(source, root_ca_der=b"not a certificate")


# -- mapping dcap-qvl's answers ----------------------------------------------------------------

_CHAIN_FAILURE = "Verification failed: Failed to verify certificate chain\n\nCaused by:\n    "


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (_CHAIN_FAILURE + "CertExpired", CollateralExpiredError),
        (_CHAIN_FAILURE + "CertNotValidYet", CollateralExpiredError),
        (_CHAIN_FAILURE + "UnknownIssuer", VerificationError),
        ("Verification failed: TCBInfo issue date is in the future", CollateralExpiredError),
        ("Verification failed: ISV enclave report signature is invalid", VerificationError),
        ("Verification failed: Fmspc mismatch", VerificationError),
    ],
)
def test_dcap_qvl_failures_are_translated(
    monkeypatch: pytest.MonkeyPatch, message: str, error: type[VerificationError]
) -> None:
    # Real vectors never reach dcap-qvl's own time checks (our window check matches them
    # exactly and runs first), so the translation is exercised with dcap-qvl's actual messages.
    def fail(*args: object) -> None:
        raise ValueError(message)

    monkeypatch.setattr(dcap_qvl, "verify", fail)
    with pytest.raises(error) as info:
        _verify("sgx/phala_sgx_v3")
    assert type(info.value) is error
    assert " ".join(message.split()).removeprefix("Verification failed: ") in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def _verified_json(name: str) -> dict[str, object]:
    coll = dcap_qvl.QuoteCollateralV3.from_json(collateral_path(name).read_text())
    return dict(json.loads(dcap_qvl.verify(quote_bytes(name), coll, now_for(name)).to_json()))


@pytest.mark.parametrize(
    ("name", "body", "field", "byte0", "debug"),
    [
        ("sgx/phala_sgx_v3", "SgxEnclave", "attributes", 0x07, True),  # DEBUG is bit 1
        ("sgx/phala_sgx_v3", "SgxEnclave", "attributes", 0x05, False),
        ("tdx/phala_tdx_v4", "TD10", "td_attributes", 0x01, True),  # TUD.DEBUG is bit 0
        ("tdx/phala_tdx_v4", "TD15", "td_attributes", 0x02, False),
    ],
)
def test_debug_bit_and_report_kinds(name: str, body: str, field: str, byte0: int, debug: bool) -> None:
    # dcap-qvl refuses debug SGX enclaves outright, so the bit is checked on its report JSON.
    verified = _verified_json(name)
    report = verified["report"]
    assert isinstance(report, dict)
    fields = dict(next(iter(report.values())))
    fields[field] = f"{byte0:02x}" + fields[field][2:]
    verified["report"] = {body: fields}
    collateral = Collateral.from_json(collateral_path(name).read_text())
    tee = TeeType.SGX if body == "SgxEnclave" else TeeType.TDX
    claims = _claims(tee, 4, verified, EXPECTED[name]["fmspc"], collateral)
    assert claims.debug is debug
    assert claims.measurement == bytes.fromhex(fields["mr_enclave" if tee is TeeType.SGX else "mr_td"])
