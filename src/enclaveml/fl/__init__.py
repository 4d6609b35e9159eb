"""Federated learning: horizontal FL with the aggregator in a TEE; vertical FL: :mod:`enclaveml.fl.vertical`.

What a participant and an aggregator's operator use for horizontal FL is re-exported here; the
strategies are in :mod:`enclaveml.fl.strategies`, and the aggregator's web app in
:mod:`enclaveml.fl.server` (``serve_aggregator``), imported by name so that a participant does not
load the web server stack. See ``docs/federated.md``.
"""

from enclaveml.fl._errors import (
    DuplicateUpdateError,
    FederatedError,
    InvalidUpdateError,
    NotEnrolledError,
    RoundMismatchError,
    TrainingFinishedError,
)
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.client import (
    AggregatorClient,
    InProcessConnection,
    Trainer,
    TrainResult,
    participate,
    state_dict_to_weights,
    weights_to_state_dict,
)
from enclaveml.fl.plan import TrainingPlan
from enclaveml.fl.strategy import ClientUpdate, Strategy, Weights
from enclaveml.fl.validation import validate_updates

__all__ = [
    "Aggregator",
    "AggregatorClient",
    "ClientUpdate",
    "DuplicateUpdateError",
    "FederatedError",
    "InProcessConnection",
    "InvalidUpdateError",
    "NotEnrolledError",
    "RoundMismatchError",
    "Strategy",
    "TrainResult",
    "Trainer",
    "TrainingFinishedError",
    "TrainingPlan",
    "Weights",
    "participate",
    "state_dict_to_weights",
    "validate_updates",
    "weights_to_state_dict",
]
