"""The training plan: the rules of a federated run, which participants verify before they upload.

Attesting the aggregator's *code* is not enough: the same code run with a different strategy,
a lower ``min_clients`` (so a single participant's update is the aggregate) or other initial
weights would betray the participants just as well. So the plan is part of the workload's
identity, bound twice:

* into the **measurement**, where the TEE measures configuration (the simulation TEE:
  ``SimulationProvider(config=plan.to_dict())``; Gramine: a manifest that embeds the plan);
* into the **RA-TLS report data**, on every TEE: the aggregator's certificate carries the nonce
  claim :func:`certificate_nonce` and ``/attestation?nonce=N`` answers evidence bound to
  :func:`fresh_nonce` ``(plan, N)``. The attested code computes both from the plan it enforces, so
  a participant that derives them from the plan *it expects* accepts only that plan.

The plan may also name its **participants**: client id -> SHA-256 (hex) of the credential the
operator issued (``enclaveml fl plan --participants REGISTRY``). The aggregator then enrols
exactly those and refuses any other credential, so the host cannot add clients of its own (which
would receive every global model and, as ``min_clients - 1`` fake clients, isolate one honest
update from the aggregate). Without the list, whoever controls the aggregator's registry file
decides who takes part. Credentials are random 256-bit tokens, so their hashes may be public.

Plan digest: SHA-256 over the canonical JSON of :meth:`TrainingPlan.to_dict` (sorted keys, no
whitespace, UTF-8). Nonces::

    certificate_nonce = SHA-256("enclaveml-fl-plan-v1" 0x00 || plan_digest)
    fresh_nonce       = SHA-256("enclaveml-fl-plan-v1" 0x00 || plan_digest || client_nonce)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from enclaveml.errors import ConfigurationError
from enclaveml.fl._wire import weights_sha256
from enclaveml.fl.strategy import Strategy, Weights

__all__ = ["TrainingPlan", "certificate_nonce", "check_credential_pins", "fresh_nonce", "token_sha256"]

_DOMAIN = b"enclaveml-fl-plan-v1\x00"
_PLAN_VERSION = 1


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that decides what the aggregate is; validated on construction.

    ``strategy`` is :meth:`Strategy.plan` (name and hyperparameters), ``validation`` the keyword
    arguments given to :func:`enclaveml.fl.validation.validate_updates`, ``model_id`` names the
    architecture and ``initial_weights_sha256`` pins the starting point (:func:`weights_sha256`).
    ``participants`` (client id -> credential SHA-256 hex), when not empty, is the whole set of
    clients the aggregator accepts (module docstring).
    """

    strategy: Mapping[str, Any]
    rounds: int
    min_clients: int
    round_timeout_s: float
    model_id: str
    initial_weights_sha256: str
    validation: Mapping[str, Any] = field(default_factory=dict)
    participants: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Mapping) or not isinstance(self.strategy.get("name"), str):
            raise ConfigurationError("plan 'strategy' must be a mapping with a 'name' (Strategy.plan())")
        if not _positive_int(self.rounds) or not _positive_int(self.min_clients):
            raise ConfigurationError("plan 'rounds' and 'min_clients' must be integers >= 1")
        if not (isinstance(self.round_timeout_s, int | float) and 0 < self.round_timeout_s < math.inf):
            raise ConfigurationError("plan 'round_timeout_s' must be a positive number of seconds")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ConfigurationError("plan 'model_id' must be a non-empty string")
        digest = self.initial_weights_sha256
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ConfigurationError("plan 'initial_weights_sha256' must be 64 lowercase hex digits")
        if not isinstance(self.validation, Mapping):
            raise ConfigurationError("plan 'validation' must be a mapping of validate_updates options")
        check_credential_pins(self.participants, "participants", max_name=128)
        object.__setattr__(self, "participants", dict(self.participants))  # a copy the caller cannot change
        if self.participants and len(self.participants) < self.min_clients:
            raise ConfigurationError(
                f"plan 'min_clients' ({self.min_clients}) exceeds its {len(self.participants)} participants"
            )
        self.canonical_json()  # fails now, not at the first client, if something is not JSON

    @classmethod
    def create(
        cls,
        strategy: Strategy,
        initial_weights: Weights,
        *,
        rounds: int,
        min_clients: int,
        round_timeout_s: float = 600.0,
        model_id: str = "model",
        validation: Mapping[str, Any] | None = None,
        participants: Mapping[str, str] | None = None,
    ) -> TrainingPlan:
        """The plan of running ``strategy`` from ``initial_weights``."""
        return cls(
            strategy=dict(strategy.plan()),
            rounds=rounds,
            min_clients=min_clients,
            round_timeout_s=float(round_timeout_s),
            model_id=model_id,
            initial_weights_sha256=weights_sha256(initial_weights),
            validation=dict(validation or {}),
            participants={} if participants is None else participants,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data: what ``/v1/fl/plan`` returns and the simulation TEE measures.

        ``participants`` appears only when the plan names them, so plans written before it
        existed keep their digest.
        """
        data: dict[str, Any] = {
            "v": _PLAN_VERSION,
            "strategy": _plain(self.strategy),
            "rounds": self.rounds,
            "min_clients": self.min_clients,
            "round_timeout_s": float(self.round_timeout_s),
            "model_id": self.model_id,
            "initial_weights_sha256": self.initial_weights_sha256,
            "validation": _plain(self.validation),
        }
        if self.participants:
            data["participants"] = dict(self.participants)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        """Inverse of :meth:`to_dict` (e.g. a plan file the participants agreed on)."""
        if not isinstance(data, Mapping) or data.get("v", _PLAN_VERSION) != _PLAN_VERSION:
            raise ConfigurationError(f'a training plan is a mapping with "v": {_PLAN_VERSION}')
        try:
            return cls(
                strategy=data["strategy"],
                rounds=data["rounds"],
                min_clients=data["min_clients"],
                round_timeout_s=data.get("round_timeout_s", 600.0),
                model_id=data["model_id"],
                initial_weights_sha256=data["initial_weights_sha256"],
                validation=data.get("validation", {}),
                participants=data.get("participants", {}),
            )
        except KeyError as exc:
            raise ConfigurationError(f"training plan lacks the field {exc.args[0]!r}") from None

    def canonical_json(self) -> bytes:
        try:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"training plan is not plain JSON data: {exc}") from exc
        return text.encode()

    @property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical_json`: the plan's identity in the RA-TLS nonces participants check."""
        return hashlib.sha256(self.canonical_json()).digest()

    @property
    def rules_digest(self) -> bytes:
        """The digest of the plan without its participant list: what sealed checkpoints are bound to.

        A run can then go on under a plan that differs only in its participants (a stolen credential
        replaced, a participant added), which every participant must still accept (they check
        :attr:`digest`); anything else that decides the aggregate starts a new run. Equal to
        :attr:`digest` for a plan that names no participants.
        """
        return replace(self, participants={}).digest


def certificate_nonce(plan_digest: bytes) -> bytes:
    """The nonce claim of the aggregator's RA-TLS certificate for a plan."""
    return hashlib.sha256(_DOMAIN + plan_digest).digest()


def fresh_nonce(plan_digest: bytes, client_nonce: bytes) -> bytes:
    """What ``/attestation?nonce=`` binds: the client's nonce *and* the plan."""
    return hashlib.sha256(_DOMAIN + plan_digest + client_nonce).digest()


def token_sha256(token: str) -> bytes:
    """What is kept of a participant's credential (registries, aggregators, vertical servers, plans)."""
    return hashlib.sha256(token.encode()).digest()


def check_credential_pins(pins: Any, what: str, *, max_name: int) -> None:
    """A plan's name -> credential SHA-256 (64 lowercase hex) mapping, one credential per name."""
    if not isinstance(pins, Mapping):
        raise ConfigurationError(f"plan {what!r} must map names to credential SHA-256 digests (hex)")
    for name, digest in pins.items():
        if not (isinstance(name, str) and 0 < len(name) <= max_name):
            raise ConfigurationError(
                f"plan {what!r}: names are non-empty strings of at most {max_name} characters"
            )
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ConfigurationError(
                f"plan {what!r}: {name!r} needs a credential SHA-256 as 64 lowercase hex digits"
            )
    if len(set(pins.values())) != len(pins):
        raise ConfigurationError(f"plan {what!r}: two names share one credential")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _plain(value: Any) -> Any:
    """Mappings and tuples as dicts and lists, so equal plans have equal JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
