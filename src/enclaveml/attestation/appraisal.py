"""The one call that turns evidence into accepted claims: verify, check the binding, appraise.

Keeping the three steps in one function means no caller can forget the binding check
(the step that ties evidence to *this* nonce or key) or the policy.
"""

from __future__ import annotations

import hmac

from enclaveml.attestation._policy_base import Policy
from enclaveml.attestation._time import Instant
from enclaveml.attestation.claims import Claims
from enclaveml.attestation.evidence import Evidence, check_report_data
from enclaveml.attestation.verifier import Verifier
from enclaveml.errors import BindingError

__all__ = ["appraise_evidence"]


def appraise_evidence(
    evidence: Evidence,
    *,
    verifier: Verifier,
    policy: Policy,
    expected_report_data: bytes | None = None,
    now: Instant = None,
) -> Claims:
    """Verify ``evidence``, check that it binds ``expected_report_data``, and appraise it.

    Raises VerificationError (bad evidence), BindingError (evidence valid but bound to other
    data) or PolicyRejectedError (valid and bound, but not acceptable). Returns the claims
    only when all three pass.
    """
    claims = verifier.verify(evidence, now=now)
    if expected_report_data is not None:
        expected = check_report_data(expected_report_data)
        if not hmac.compare_digest(claims.report_data, expected):
            raise BindingError(
                "evidence report_data does not match the expected binding "
                f"(observed {claims.report_data.hex()[:16]}..., expected {expected.hex()[:16]}...)"
            )
    policy.check(claims)
    return claims
