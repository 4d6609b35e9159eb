"""Verifications per second: bare dcap-qvl vs enclaveml's full path on the same real quote.

The full path is what a relying party runs: decode the evidence bytes, verify the quote
against collateral (dcap-qvl underneath), build typed claims, and appraise them against a
policy. Goal: at least 0.9x the bare rate. Run: ``.venv/bin/python benchmarks/attestation.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dcap_qvl

from benchmarks._common import rate, write_results
from enclaveml.attestation._collateral import LocalCollateral
from enclaveml.attestation._dcap import DcapVerifier
from enclaveml.attestation.evidence import Evidence
from enclaveml.attestation.policy import AllOf, DebugMode, MeasurementAllowlist, TcbStatus

VECTORS = Path(__file__).parent.parent / "tests" / "vectors" / "data"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())["cases"]
CASES = ["sgx/phala_sgx_v3", "tdx/phala_tdx_v4"]


def measure(case: str, seconds: float) -> dict[str, float]:
    info = EXPECTED[case]
    folder = VECTORS / case.split("/")[0]
    quote_bytes = (folder / info["quote"]).read_bytes()
    collateral_path = folder / info["collateral"]
    now = info["recommended_now_unix"]
    raw_collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_path.read_text())
    verifier = DcapVerifier(LocalCollateral(collateral_path))
    measurement = bytes.fromhex(info["report"].get("mr_enclave") or info["report"]["mr_td"])
    policy = AllOf(
        MeasurementAllowlist([measurement]),
        DebugMode(),
        TcbStatus(accepted=[info["expected"]["status"]]),
    )

    def bare() -> None:
        dcap_qvl.verify(quote_bytes, raw_collateral, now)

    def full() -> None:
        policy.check(verifier.verify(Evidence.from_bytes(quote_bytes), now=now))

    full()  # fail loudly before timing if the path does not accept the quote
    # Interleave the two measurements so drift on a shared machine hits both alike.
    bare_rates, full_rates = [], []
    for _ in range(3):
        bare_rates.append(rate(bare, min_seconds=seconds / 3))
        full_rates.append(rate(full, min_seconds=seconds / 3))
    bare_rate, full_rate = max(bare_rates), max(full_rates)
    return {
        "bare_dcap_qvl_per_s": bare_rate,
        "enclaveml_full_path_per_s": full_rate,
        "ratio": full_rate / bare_rate,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per case and path")
    args = parser.parse_args()
    results = {case: measure(case, args.seconds) for case in CASES}
    path = write_results("attestation", {"goal_ratio": 0.9, "cases": results})
    for case, r in results.items():
        print(
            f"{case}: bare {r['bare_dcap_qvl_per_s']:.0f}/s, "
            f"enclaveml {r['enclaveml_full_path_per_s']:.0f}/s, ratio {r['ratio']:.3f}"
        )
    print(f"results: {path}")
    return 0 if all(r["ratio"] >= 0.9 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
