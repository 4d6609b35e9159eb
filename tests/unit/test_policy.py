"""Appraisal policy: every rule at its boundary, composition, fail-closed defaults, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enclaveml.attestation.claims import Claims, SgxClaims, SimulatedClaims, SnpClaims, SnpTcb, TdxClaims
from enclaveml.attestation.evidence import TeeType
from enclaveml.attestation.policy import (
    AllOf,
    AnyOf,
    ClaimEquals,
    DebugMode,
    MeasurementAllowlist,
    Policy,
    ReportDataEquals,
    SgxSigner,
    SnpMinimumTcb,
    TcbStatus,
    TeeTypes,
    UnsafeAllowSimulation,
    default_policy,
    dump_policy,
    load_policy,
    policy_from_dict,
)
from enclaveml.errors import ConfigurationError, PolicyRejectedError

MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
MRSIGNER = bytes.fromhex("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")


def sgx(**overrides: object) -> SgxClaims:
    fields: dict[str, object] = dict(
        tee=TeeType.SGX,
        measurement=MRENCLAVE,
        report_data=b"\x00" * 64,
        debug=False,
        tcb_status="UpToDate",
        advisory_ids=(),
        mrsigner=MRSIGNER,
        isv_prod_id=7,
        isv_svn=3,
        attributes=bytes(16),
        cpu_svn=bytes(16),
    )
    fields.update(overrides)
    return SgxClaims(**fields)  # type: ignore[arg-type]


def tdx(**overrides: object) -> TdxClaims:
    fields: dict[str, object] = dict(
        tee=TeeType.TDX,
        measurement=b"\x11" * 48,
        report_data=b"\x00" * 64,
        debug=False,
        tcb_status="UpToDate",
        rtmr=(b"\x00" * 48, b"\x01" * 48, b"\x02" * 48, b"\x03" * 48),
        mr_config_id=b"\x00" * 48,
        mr_owner=b"\x00" * 48,
        mr_owner_config=b"\x00" * 48,
        mr_seam=b"\x00" * 48,
        td_attributes=bytes(8),
        xfam=bytes(8),
        tee_tcb_svn=bytes(16),
    )
    fields.update(overrides)
    return TdxClaims(**fields)  # type: ignore[arg-type]


def snp(tcb: SnpTcb = SnpTcb(3, 0, 8, 115), **overrides: object) -> SnpClaims:
    fields: dict[str, object] = dict(
        tee=TeeType.SEV_SNP,
        measurement=b"\x22" * 48,
        report_data=b"\x00" * 64,
        debug=False,
        host_data=b"\x05" * 32,
        policy=0x30000,
        reported_tcb=tcb,
        chip_id=b"\x09" * 64,
        guest_svn=0,
        vmpl=0,
        family_id=bytes(16),
        image_id=bytes(16),
        id_key_digest=bytes(48),
        author_key_digest=bytes(48),
        report_version=2,
    )
    fields.update(overrides)
    return SnpClaims(**fields)  # type: ignore[arg-type]


def sim(measurement: bytes = b"\x33" * 48) -> SimulatedClaims:
    return SimulatedClaims(
        tee=TeeType.SIMULATION, measurement=measurement, report_data=b"\x00" * 64, debug=False
    )


def rejects(policy: Policy, claims: Claims, rule: str) -> PolicyRejectedError:
    with pytest.raises(PolicyRejectedError) as info:
        policy.check(claims)
    assert info.value.rule == rule
    return info.value


# -- composition ------------------------------------------------------------------------------------


def test_empty_all_of_rejects() -> None:
    rejects(AllOf(), sgx(), "all_of")


def test_empty_any_of_rejects() -> None:
    rejects(AnyOf(), sgx(), "any_of")


def test_all_of_needs_every_rule() -> None:
    policy = AllOf(MeasurementAllowlist([MRENCLAVE]), DebugMode())
    policy.check(sgx())
    err = rejects(policy, sgx(debug=True), "debug")
    assert err.observed == "debug=true"


def test_any_of_needs_one_rule_and_reports_all_failures() -> None:
    policy = AnyOf(MeasurementAllowlist([b"\x01" * 32]), MeasurementAllowlist([MRENCLAVE]))
    policy.check(sgx())
    err = rejects(
        AnyOf(MeasurementAllowlist([b"\x01" * 32]), TcbStatus()), sgx(tcb_status="OutOfDate"), "any_of"
    )
    assert "measurement" in err.observed
    assert "tcb_status" in err.observed


def test_composites_refuse_non_policies() -> None:
    with pytest.raises(ConfigurationError):
        AllOf("measurement")  # type: ignore[arg-type]


# -- simulation gate -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        default_policy(),
        MeasurementAllowlist([b"\x33" * 48]),
        DebugMode(allow=True),
        TeeTypes(["simulation"]),
        AnyOf(DebugMode(allow=True), TeeTypes(["simulation"])),
    ],
    ids=lambda p: p.type_name,
)
def test_simulation_is_rejected_by_every_safe_policy(policy: Policy) -> None:
    with pytest.raises(PolicyRejectedError, match="simulated evidence") as info:
        policy.check(sim())
    assert "unsafe_allow_simulation" in str(info.value)


def test_unsafe_wrapper_admits_simulation_but_still_appraises(caplog: pytest.LogCaptureFixture) -> None:
    policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([b"\x33" * 48]), DebugMode()))
    policy.check(sim())
    assert "SIMULATED" in caplog.text
    rejects(policy, sim(b"\x34" * 48), "measurement")
    assert "unsafe" in policy.type_name


def test_unsafe_wrapper_does_not_leak_into_sibling_branches() -> None:
    policy = AllOf(UnsafeAllowSimulation(DebugMode()), MeasurementAllowlist([b"\x33" * 48]))
    err = rejects(policy, sim(), "simulation")
    assert "measurement" in str(err)


# -- leaf rules at their boundaries ------------------------------------------------------------------


def test_measurement_allowlist_boundary() -> None:
    policy = MeasurementAllowlist([MRENCLAVE.hex()])
    policy.check(sgx())
    err = rejects(policy, sgx(measurement=MRENCLAVE[:-1] + b"\x00"), "measurement")
    assert err.observed.startswith("mrenclave=")
    assert MRENCLAVE.hex() in err.expected
    rejects(MeasurementAllowlist([MRENCLAVE]), tdx(), "measurement")
    with pytest.raises(ConfigurationError):
        MeasurementAllowlist([])


def test_sgx_signer_product_and_minimum_svn() -> None:
    SgxSigner(MRSIGNER, 7, min_isv_svn=3).check(sgx())
    rejects(SgxSigner(MRSIGNER, 7, min_isv_svn=4), sgx(), "sgx_signer")  # svn 3 < 4
    rejects(SgxSigner(MRSIGNER, 8), sgx(), "sgx_signer")
    rejects(SgxSigner(b"\x00" * 32, 7), sgx(), "sgx_signer")
    err = rejects(SgxSigner(MRSIGNER, 7), tdx(), "sgx_signer")
    assert "tdx" in err.observed
    with pytest.raises(ConfigurationError):
        SgxSigner(b"\x00" * 31, 7)


def test_debug_forbidden_unless_allowed() -> None:
    DebugMode().check(sgx())
    rejects(DebugMode(), sgx(debug=True), "debug")
    DebugMode(allow=True).check(sgx(debug=True))
    rejects(DebugMode(), snp(debug=True), "debug")


def test_tcb_status_accepted_and_advisories() -> None:
    TcbStatus().check(sgx())
    err = rejects(TcbStatus(), sgx(tcb_status="SWHardeningNeeded"), "tcb_status")
    assert "SWHardeningNeeded" in err.observed
    relaxed = TcbStatus(accepted=["UpToDate", "SWHardeningNeeded"], rejected_advisories=["INTEL-SA-00615"])
    relaxed.check(sgx(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00289",)))
    err = rejects(
        relaxed, sgx(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",)), "tcb_status"
    )
    assert "INTEL-SA-00615" in err.observed
    err = rejects(TcbStatus(), snp(), "tcb_status")
    assert "snp_min_tcb" in str(err)


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "tcb_status", "accepted": ["UpToDate"], "rejected_advisories": "INTEL-SA-00615"},
        {"type": "tcb_status", "accepted": "UpToDate"},
        {"type": "tcb_status", "accepted": ["UpToDate", 1]},
    ],
)
def test_tcb_status_lists_must_be_lists_of_strings(rule: dict[str, object]) -> None:
    """A bare string would be split into characters: its advisory never matched (failed open)."""
    with pytest.raises(ConfigurationError, match="must be a list of strings"):
        policy_from_dict(rule)
    policy = policy_from_dict({**rule, "accepted": ["UpToDate"], "rejected_advisories": ["INTEL-SA-00615"]})
    rejects(policy, sgx(advisory_ids=("INTEL-SA-00615",)), "tcb_status")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"rejected_advisories": ["INTEL-SA-615"]}, "not an Intel advisory id"),  # would never match
        ({"rejected_advisories": ["INTEL SA 00615"]}, "not an Intel advisory id"),
        ({"rejected_advisories": [""]}, "not an Intel advisory id"),
        ({"accepted": ["uptodate"]}, "unknown statuses"),
        ({"accepted": ["UpToDate", "SwHardeningNeeded"]}, "unknown statuses"),
    ],
)
def test_tcb_status_entries_that_could_never_match_are_refused(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        policy_from_dict({"type": "tcb_status", **rule})


def test_a_minimum_tcb_evaluation_is_optional_and_checked() -> None:
    assert "min_evaluation_data_number" not in TcbStatus().to_dict()  # older policies keep their JSON
    policy = policy_from_dict({"type": "tcb_status", "min_evaluation_data_number": 18})
    assert policy_from_dict(policy.to_dict()).to_dict() == policy.to_dict()
    policy.check(sgx(tcb_evaluation_data_number=18))
    rejects(policy, sgx(tcb_evaluation_data_number=17), "tcb_status")
    rejects(policy, sgx(), "tcb_status")  # unknown evaluation: not known to be recent enough
    for bad in (-1, True, "18", 1.5):
        with pytest.raises(ConfigurationError, match="min_evaluation_data_number"):
            TcbStatus(min_evaluation_data_number=bad)  # type: ignore[arg-type]


def test_every_status_dcap_qvl_reports_can_be_accepted() -> None:
    for status in ("TDRelaunchAdvised", "TDRelaunchAdvisedConfigurationNeeded", "Revoked"):
        TcbStatus(accepted=[status]).check(tdx(tcb_status=status))


def test_rejected_advisories_are_compared_upper_case() -> None:
    policy = policy_from_dict({"type": "tcb_status", "rejected_advisories": [" intel-sa-00615"]})
    assert policy.to_dict()["rejected_advisories"] == ["INTEL-SA-00615"]
    rejects(policy, sgx(advisory_ids=("INTEL-SA-00615",)), "tcb_status")
    policy.check(sgx(advisory_ids=("INTEL-SA-00289",)))


def test_snp_minimum_tcb_boundary() -> None:
    SnpMinimumTcb(3, 0, 8, 115).check(snp())
    rejects(SnpMinimumTcb(3, 0, 8, 116), snp(), "snp_min_tcb")
    rejects(SnpMinimumTcb(4, 0, 0, 0), snp(), "snp_min_tcb")
    rejects(SnpMinimumTcb(), sgx(), "snp_min_tcb")


def test_report_data_exact_and_zero_padded() -> None:
    claims = sgx(report_data=b"Hello, world!" + bytes(51))
    ReportDataEquals(b"Hello, world!").check(claims)
    rejects(ReportDataEquals(b"Hello, world?"), claims, "report_data")
    rejects(ReportDataEquals(b"Hello, world!\x01"), claims, "report_data")
    with pytest.raises(ConfigurationError):
        ReportDataEquals(b"x" * 65)


def test_claim_equals_and_rtmr() -> None:
    ClaimEquals("rtmr3", "03" * 48).check(tdx())
    rejects(ClaimEquals("rtmr3", "04" * 48), tdx(), "claim")
    ClaimEquals("host_data", b"\x05" * 32).check(snp())
    err = rejects(ClaimEquals("host_data", b"\x05" * 32), sgx(), "claim")
    assert "no claim" in err.observed
    ClaimEquals("isv_prod_id", 7).check(sgx())
    rejects(ClaimEquals("isv_prod_id", 8), sgx(), "claim")


def test_tee_types() -> None:
    TeeTypes(["sgx", "tdx"]).check(tdx())
    rejects(TeeTypes(["sgx"]), snp(), "tee")
    with pytest.raises(ConfigurationError):
        TeeTypes(["nitro"])


# -- files -----------------------------------------------------------------------------------------------


def test_toml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
type = "all_of"

[[rules]]
type = "measurement"
values = ["{MRENCLAVE.hex()}"]

[[rules]]
type = "debug"

[[rules]]
type = "tcb_status"
accepted = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
rejected_advisories = ["INTEL-SA-00334"]
"""
    )
    policy = load_policy(path)
    policy.check(sgx(tcb_status="ConfigurationAndSWHardeningNeeded"))
    rejects(policy, sgx(debug=True), "debug")
    again = tmp_path / "policy.json"
    again.write_text(dump_policy(policy))
    assert load_policy(again) == policy


def test_unsafe_policy_loads_from_json(tmp_path: Path) -> None:
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"type": "unsafe_allow_simulation", "policy": {"type": "debug"}}))
    load_policy(path).check(sim())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "nope"}, "unknown policy type"),
        ({"type": "debug", "alow": True}, "unknown keys"),
        ({"type": "measurement", "values": "abcd"}, "must be a list"),
        ({"type": "measurement", "values": ["zz"]}, "must be hex"),
        ({"type": "sgx_signer", "mrsigner": MRSIGNER.hex()}, "invalid parameters"),
        ({"type": "all_of", "rules": [{"type": "debug", "allow": "no"}]}, "true or false"),
        ([], "must be a table"),
    ],
)
def test_bad_policy_data_is_a_configuration_error(data: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        policy_from_dict(data)


def test_unreadable_or_malformed_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("type = [")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_policy(bad)


def test_policy_nesting_is_bounded_before_anything_recurses() -> None:
    def nested(depth: int) -> dict[str, object]:
        policy: dict[str, object] = {"type": "debug", "allow": False}
        for _ in range(depth):
            policy = {"type": "all_of", "rules": [policy]}
        return policy

    policy_from_dict(nested(15)).check(sgx())  # 15 rules deep: 31 tables and lists, accepted
    for depth in (16, 400, 5000):  # 5000 would exhaust the interpreter's recursion limit
        with pytest.raises(ConfigurationError, match="nest at most"):
            policy_from_dict(nested(depth))
