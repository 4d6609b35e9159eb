"""Attestation: collect TEE evidence, verify it, appraise it against a policy, bind it to TLS keys.

The public names are re-exported here; modules with a leading underscore are private.
The simulation backend is deliberately *not* re-exported: it must be imported by name
(``enclaveml.attestation.simulation``) so that production code never loads it by accident.
"""

from enclaveml.attestation._collateral import Collateral, CollateralSource, LocalCollateral
from enclaveml.attestation._dcap import DcapVerifier
from enclaveml.attestation._pccs import PccsCollateral
from enclaveml.attestation._snp import SnpVerifier
from enclaveml.attestation.appraisal import appraise_evidence
from enclaveml.attestation.claims import Claims, SgxClaims, SimulatedClaims, SnpClaims, SnpTcb, TdxClaims
from enclaveml.attestation.evidence import Evidence, EvidenceProvider, TeeType
from enclaveml.attestation.policy import (
    AllOf,
    AnyOf,
    ClaimEquals,
    DebugMode,
    MeasurementAllowlist,
    Policy,
    ReportDataEquals,
    SgxSigner,
    SnpGuest,
    SnpMinimumTcb,
    TcbStatus,
    TeeTypes,
    UnsafeAllowSimulation,
    default_policy,
    dump_policy,
    load_policy,
    policy_from_dict,
)
from enclaveml.attestation.providers import GramineProvider, TsmProvider, detect, provider_by_name
from enclaveml.attestation.ratls import (
    RatlsCertificate,
    VerifiedPeer,
    create_ratls_certificate,
    verify_ratls_certificate,
)
from enclaveml.attestation.tls import AttestedServer, attest_server, pinned_ssl_context, server_ssl_context
from enclaveml.attestation.verifier import EvidenceVerifier, Verifier

__all__ = [
    "AllOf",
    "AnyOf",
    "AttestedServer",
    "ClaimEquals",
    "Claims",
    "Collateral",
    "CollateralSource",
    "DcapVerifier",
    "DebugMode",
    "Evidence",
    "EvidenceProvider",
    "EvidenceVerifier",
    "GramineProvider",
    "LocalCollateral",
    "MeasurementAllowlist",
    "PccsCollateral",
    "Policy",
    "RatlsCertificate",
    "ReportDataEquals",
    "SgxClaims",
    "SgxSigner",
    "SimulatedClaims",
    "SnpClaims",
    "SnpGuest",
    "SnpMinimumTcb",
    "SnpTcb",
    "SnpVerifier",
    "TcbStatus",
    "TdxClaims",
    "TeeType",
    "TeeTypes",
    "TsmProvider",
    "UnsafeAllowSimulation",
    "VerifiedPeer",
    "Verifier",
    "appraise_evidence",
    "attest_server",
    "create_ratls_certificate",
    "default_policy",
    "detect",
    "dump_policy",
    "load_policy",
    "pinned_ssl_context",
    "policy_from_dict",
    "provider_by_name",
    "server_ssl_context",
    "verify_ratls_certificate",
]
