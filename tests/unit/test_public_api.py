"""The curated public API: exactly the intended names, and simulation only by explicit import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import enclaveml
import enclaveml.attestation as attestation


def test_top_level_names() -> None:
    assert sorted(enclaveml.__all__) == ["AsyncClient", "Client", "EnclaveMLError", "__version__"]
    from enclaveml.serving.client import AsyncClient, Client

    assert (enclaveml.Client, enclaveml.AsyncClient) == (Client, AsyncClient)
    with pytest.raises(AttributeError):
        enclaveml.NoSuchThing
    # The SDK is loaded on first use: importing the package (as the CLI does) pulls in no HTTP client.
    code = "import sys, enclaveml; print('httpx' in sys.modules, 'enclaveml.serving.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_attestation_names_are_exactly_the_intended_ones() -> None:
    assert set(attestation.__all__) == {
        "AllOf", "AnyOf", "AttestedServer", "ClaimEquals", "Claims", "Collateral", "CollateralSource",
        "DcapVerifier", "DebugMode", "Evidence", "EvidenceProvider", "EvidenceVerifier", "GramineProvider",
        "LocalCollateral", "MeasurementAllowlist", "PccsCollateral", "Policy", "RatlsCertificate",
        "ReportDataEquals", "SgxClaims", "SgxSigner", "SimulatedClaims", "SnpClaims", "SnpGuest",
        "SnpMinimumTcb",
        "SnpTcb", "SnpVerifier", "TcbStatus", "TdxClaims", "TeeType", "TeeTypes", "TsmProvider",
        "UnsafeAllowSimulation", "VerifiedPeer", "Verifier", "appraise_evidence", "attest_server",
        "create_ratls_certificate", "default_policy", "detect", "dump_policy", "load_policy",
        "pinned_ssl_context", "policy_from_dict", "provider_by_name", "server_ssl_context",
        "verify_ratls_certificate",
    }  # fmt: skip
    for name in attestation.__all__:
        assert getattr(attestation, name) is not None
    assert not [n for n in attestation.__all__ if n.startswith("_")]


def test_importing_the_package_and_cli_does_not_load_simulation() -> None:
    code = (
        "import sys, enclaveml.attestation, enclaveml.cli; "
        "print('enclaveml.attestation.simulation' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_crypto_names() -> None:
    import enclaveml.crypto as crypto

    assert set(crypto.__all__) == {
        "DataKeyUnwrapper", "DataKeyWrapper", "KeyHandle", "KeyRing", "SealedHeader", "read_header",
        "seal_bytes", "seal_file", "unseal_bytes", "unseal_file", "unseal_file_to_bytes", "unseal_stream",
    }  # fmt: skip


def test_kms_client_names_and_no_server_import() -> None:
    import enclaveml.kms as kms

    assert set(kms.__all__) == {"AuditVerification", "KeyBrokerAdmin", "KeyBrokerClient", "KeyInfo"}
    code = "import sys, enclaveml.kms; print('fastapi' in sys.modules, 'enclaveml.kms.server' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_vertical_fl_names_and_no_server_import() -> None:
    import enclaveml.fl.vertical as vertical

    assert set(vertical.__all__) == {
        "BoostedTrees", "BoostingParams", "BoostingParty", "InProcessChannel", "JobOutcome", "LogRegParams",
        "LogRegParty", "LogRegShare", "MessageError", "PartyChannel", "PartyEndpoint", "PartyFailedError",
        "PartyThresholds", "ProtocolError", "PsiParty", "PsiSummary", "ServerConnection", "VerticalError",
        "VerticalPlan", "predict_boosting", "predict_logreg", "run_psi", "train_boosting", "train_logreg",
    }  # fmt: skip
    code = "import sys, enclaveml.fl.vertical; print('fastapi' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_horizontal_fl_names_and_no_server_or_torch_import() -> None:
    import enclaveml.fl as fl

    assert set(fl.__all__) == {
        "Aggregator", "AggregatorClient", "ClientUpdate", "DuplicateUpdateError", "FederatedError",
        "InProcessConnection", "InvalidUpdateError", "NotEnrolledError", "RoundMismatchError", "Strategy",
        "TrainResult", "Trainer", "TrainingFinishedError", "TrainingPlan", "Weights", "participate",
        "state_dict_to_weights", "validate_updates", "weights_to_state_dict",
    }  # fmt: skip
    code = "import sys, enclaveml.fl; print('fastapi' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
