"""The verifier interface, and the dispatcher that routes evidence to the right verifier.

A verifier checks signatures, certificate chains and collateral and returns typed
:class:`~enclaveml.attestation.claims.Claims`; it never decides whether those claims are
*acceptable*, which is the appraisal policy's job (RFC 9334 roles: verifier vs. relying
party policy). ``now`` is injectable on every verifier.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from enclaveml.attestation._time import Instant
from enclaveml.attestation.claims import Claims
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import VerificationError

__all__ = ["EvidenceVerifier", "Verifier"]


@runtime_checkable
class Verifier(Protocol):
    """Checks one kind of evidence and returns its claims, or raises VerificationError."""

    def verify(self, evidence: Evidence, *, now: Instant = None) -> Claims:
        """Verify ``evidence`` at time ``now`` (Unix seconds or aware datetime; None = now)."""
        ...


class EvidenceVerifier:
    """Routes evidence to the verifier configured for its TEE type.

    A TEE type without a configured verifier is rejected; in particular simulation
    evidence is rejected unless a simulation verifier (holding the simulation public key)
    was passed in explicitly.
    """

    def __init__(
        self,
        *,
        dcap: Verifier | None = None,
        snp: Verifier | None = None,
        simulation: Verifier | None = None,
    ) -> None:
        self._by_tee: dict[TeeType, Verifier] = {}
        if dcap is not None:
            self._by_tee[TeeType.SGX] = dcap
            self._by_tee[TeeType.TDX] = dcap
        if snp is not None:
            self._by_tee[TeeType.SEV_SNP] = snp
        if simulation is not None:
            self._by_tee[TeeType.SIMULATION] = simulation

    @property
    def supported(self) -> frozenset[TeeType]:
        """TEE types this dispatcher can verify."""
        return frozenset(self._by_tee)

    def verify(self, evidence: Evidence, *, now: Instant = None) -> Claims:
        verifier = self._by_tee.get(evidence.tee)
        if verifier is None:
            hint = (
                " (simulation evidence is only verifiable with an explicitly configured "
                "simulation public key)"
                if evidence.tee is TeeType.SIMULATION
                else ""
            )
            raise VerificationError(f"no verifier configured for {evidence.tee.value} evidence{hint}")
        return verifier.verify(evidence, now=now)
