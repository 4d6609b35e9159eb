"""The errors of federated learning, all under :class:`~enclaveml.errors.EnclaveMLError`.

::

    EnclaveMLError
    └── FederatedError              the aggregator refused a participant's request
        ├── NotEnrolledError        unknown or revoked credential (HTTP 401)
        ├── RoundMismatchError      an upload for a round that is not open (HTTP 409)
        ├── DuplicateUpdateError    a second upload from one client for one round (HTTP 409)
        ├── InvalidUpdateError      the upload could not be decoded (HTTP 400)
        └── TrainingFinishedError   every planned round is done; nothing more is accepted (HTTP 410)

A *refused aggregator* (wrong code, wrong plan) is not in this tree: the client raises the
attestation errors (:class:`~enclaveml.errors.PolicyRejectedError`, ``BindingError``, ...)
for it, exactly as the serving client does. An update that decodes but fails validation
(NaN, wrong shape, norm outlier) raises nothing: it is recorded as rejected and the round goes on.
"""

from __future__ import annotations

from enclaveml.errors import EnclaveMLError

__all__ = [
    "DuplicateUpdateError",
    "FederatedError",
    "InvalidUpdateError",
    "NotEnrolledError",
    "RoundMismatchError",
    "TrainingFinishedError",
    "UploadInProgressError",
]


class FederatedError(EnclaveMLError):
    """The aggregator refused a request; ``status`` is the HTTP status the transport uses for it."""

    status = 400


class NotEnrolledError(FederatedError):
    """The credential matches no enrolled client. Ask the operator for (re-)enrolment."""

    status = 401


class RoundMismatchError(FederatedError):
    """The update names a round that is not open; fetch the global model again and retrain.

    ``current`` is the round that is open now.
    """

    status = 409

    def __init__(self, message: str, *, current: int) -> None:
        super().__init__(message)
        self.current = current


class DuplicateUpdateError(FederatedError):
    """This client already uploaded for this round; wait for the next one."""

    status = 409


class UploadInProgressError(FederatedError):
    """An earlier upload of this client is still being received: send the same update again later.

    Not a duplicate (nothing is counted yet): a client whose first attempt timed out on its side
    while the aggregator still reads it retries the same update after ``Retry-After``.
    """

    status = 503


class InvalidUpdateError(FederatedError):
    """The upload is not a well-formed update message (see :mod:`enclaveml.fl._wire`)."""

    status = 400


class TrainingFinishedError(FederatedError):
    """All planned rounds are complete; fetch the final global model instead of uploading."""

    status = 410
