"""Vertical federated learning: private set intersection, vertical boosted trees and logistic regression.

Parties hold different columns about the same rows; a server in a TEE drives every protocol
(:mod:`enclaveml.fl.vertical._channel`). What a party and its client code use is re-exported here;
the server's web app lives in :mod:`enclaveml.fl.vertical.server` (``serve_vertical``) and is
imported by name, so a party does not load the web server stack. See ``docs/vertical.md``.
"""

from enclaveml.fl.vertical._channel import InProcessChannel, PartyChannel, PartyEndpoint
from enclaveml.fl.vertical._errors import MessageError, PartyFailedError, ProtocolError, VerticalError
from enclaveml.fl.vertical.boosting import (
    BoostedTrees,
    BoostingParams,
    BoostingParty,
    PartyThresholds,
    predict_boosting,
    train_boosting,
)
from enclaveml.fl.vertical.logreg import (
    LogRegParams,
    LogRegParty,
    LogRegShare,
    predict_logreg,
    train_logreg,
)
from enclaveml.fl.vertical.party import JobOutcome, ServerConnection
from enclaveml.fl.vertical.plan import VerticalPlan
from enclaveml.fl.vertical.psi import PsiParty, PsiSummary, run_psi

__all__ = [
    "BoostedTrees",
    "BoostingParams",
    "BoostingParty",
    "InProcessChannel",
    "JobOutcome",
    "LogRegParams",
    "LogRegParty",
    "LogRegShare",
    "MessageError",
    "PartyChannel",
    "PartyEndpoint",
    "PartyFailedError",
    "PartyThresholds",
    "ProtocolError",
    "PsiParty",
    "PsiSummary",
    "ServerConnection",
    "VerticalError",
    "VerticalPlan",
    "predict_boosting",
    "predict_logreg",
    "run_psi",
    "train_boosting",
    "train_logreg",
]
