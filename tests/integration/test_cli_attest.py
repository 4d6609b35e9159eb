"""`enclaveml attest verify|collect` and `enclaveml demo` on real vectors and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from enclaveml.cli import app
from tests.conftest import VECTORS

EXPECTED = json.loads((VECTORS / "expected.json").read_text())["cases"]
runner = CliRunner()


def _verify(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["attest", "verify", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_sgx_vector_prints_expected_claims_and_names_rejecting_rule() -> None:
    case = EXPECTED["sgx/phala_sgx_v3"]
    code, out = _verify(
        str(VECTORS / "sgx" / case["quote"]),
        "--collateral",
        str(VECTORS / "sgx" / case["collateral"]),
        "--at",
        str(case["recommended_now_unix"]),
    )
    claims = out["claims"]
    assert claims["measurement"] == case["report"]["mr_enclave"]
    assert claims["mrsigner"] == case["report"]["mr_signer"]
    assert claims["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert claims["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    # The default policy accepts only UpToDate: exit 1 naming the rule.
    assert code == 1
    assert out["verdict"] == {
        "accepted": False,
        "rule": "tcb_status",
        "observed": (
            "tcb_status=ConfigurationAndSWHardeningNeeded advisories=['INTEL-SA-00289', 'INTEL-SA-00615']"
        ),
        "expected": "status in ['UpToDate']",
    }


def test_tdx_vector_accepted_with_policy_file(tmp_path: Path) -> None:
    case = EXPECTED["tdx/phala_tdx_v4"]
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'type = "all_of"\n[[rules]]\ntype = "measurement"\nvalues = ["{case["report"]["mr_td"]}"]\n'
        '[[rules]]\ntype = "debug"\n[[rules]]\ntype = "tcb_status"\n'
    )
    code, out = _verify(
        str(VECTORS / "tdx" / case["quote"]),
        "--collateral",
        str(VECTORS / "tdx"),
        "--policy",
        str(policy),
        "--at",
        str(case["recommended_now_unix"]),
    )
    assert code == 0, out
    assert out["verdict"] == {"accepted": True}
    assert out["claims"]["rtmr"][0] == case["report"]["rt_mr0"]


def test_tampered_quote_exits_non_zero(tmp_path: Path) -> None:
    case = EXPECTED["sgx/phala_sgx_v3"]
    quote = bytearray((VECTORS / "sgx" / case["quote"]).read_bytes())
    quote[48 + 64] ^= 0x01  # inside MRENCLAVE
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(quote))
    code, out = _verify(
        str(tampered),
        "--collateral",
        str(VECTORS / "sgx" / case["collateral"]),
        "--at",
        str(case["recommended_now_unix"]),
    )
    assert code == 2
    assert out["error"]["stage"] == "verification"
    assert "claims" not in out


def test_snp_vector_with_vcek() -> None:
    code, out = _verify(
        str(VECTORS / "sev-snp" / "virtee_milan.report.hex"),
        "--vcek",
        str(VECTORS / "sev-snp" / "virtee_milan.vcek.der"),
        "--at",
        "1800000000",
    )
    fields = EXPECTED["sev-snp/virtee_milan"]["fields"]
    assert out["claims"]["measurement"] == fields["measurement"]
    assert out["claims"]["chip_id"] == fields["chip_id"]
    assert code == 1  # SEV-SNP has no TCB status; the default policy says so
    assert out["verdict"]["rule"] == "tcb_status"


def test_quote_without_collateral_is_a_usage_error() -> None:
    code, out = _verify(str(VECTORS / "sgx" / "phala_sgx_v3.quote.bin"))
    assert code == 3
    assert "--collateral" in out["error"]["message"]


def test_collect_and_verify_simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "sim.pem"
    monkeypatch.setenv("ENCLAVEML_SIMULATION_KEY", str(key))
    evidence = tmp_path / "evidence.cbor"
    result = runner.invoke(
        app, ["attest", "collect", "-o", str(evidence), "--tee", "simulation", "--report-data", "ab" * 8]
    )
    assert result.exit_code == 0, result.output
    assert "protects nothing" in result.stderr
    # Without the key, simulation evidence cannot be verified at all.
    code, out = _verify(str(evidence))
    assert code == 3
    # With the key, it verifies but the default policy rejects it.
    code, out = _verify(str(evidence), "--simulation-key", str(key))
    assert code == 1
    assert out["claims"]["simulated"] is True
    assert out["claims"]["report_data"] == "ab" * 8 + "00" * 56
    assert out["verdict"]["rule"] == "simulation"


def test_collect_without_tee_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["attest", "collect", "-o", str(tmp_path / "e.cbor")])
    assert result.exit_code != 0
    assert "never selected automatically" in result.stderr or "no supported TEE" in result.stderr
    assert not (tmp_path / "e.cbor").exists()


def test_demo_runs_as_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from enclaveml.cli import main; main()", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SIMULATION" in proc.stdout
    assert "key DENIED" in proc.stdout
    assert "REFUSED" in proc.stdout
    accuracy = float(proc.stdout.split("held-out digits: ")[1].split()[0])
    assert accuracy > 0.9
    assert "where each secret lived" in proc.stdout


def test_a_demo_stopped_with_sigterm_removes_its_working_directory(tmp_path: Path) -> None:
    # SIGTERM (kill, timeout, docker stop) ended the process where it stood: the sealed model,
    # the broker's database and certificate stayed in $TMPDIR.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from enclaveml.cli import main; main()", "demo"],
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("enclaveml-demo-*/digits.sealed")):  # mid-run, broker up
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the demo did not get that far"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    # (ONNX Runtime writes $TMPDIR/.ses when imported: a timestamp and a random id, no data.)
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["attest", "verify", "x.bin", "--bogus"], 3),  # click would answer usage errors with 2
        (["attest", "verify"], 3),
        ([], 3),
        (["--help"], 0),
        (["version"], 0),
    ],
)
def test_the_installed_command_keeps_its_exit_codes_for_usage_errors(
    tmp_path: Path, args: list[str], code: int
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", "from enclaveml.cli import main; main()", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == code, run.stderr
    if code == 3 and args:
        assert "Usage: " in run.stderr


def test_the_installed_command_exits_2_when_evidence_fails_verification(tmp_path: Path) -> None:
    (tmp_path / "garbage.bin").write_bytes(b"garbage")
    failed = subprocess.run(
        [sys.executable, "-c", "from enclaveml.cli import main; main()", "attest", "verify", "garbage.bin"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
