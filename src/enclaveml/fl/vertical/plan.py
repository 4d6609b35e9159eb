"""The vertical-FL job plan: what the server in the TEE will do with the parties' data, checked by each party.

As for horizontal FL (:mod:`enclaveml.fl.plan`), attesting the server's *code* is not enough: the
same code told to run another task, to treat another party as the label holder or to use other
hyperparameters would misuse the parties' data just as well. So the plan is part of the
workload's identity: the server's RA-TLS certificate carries the nonce claim
:func:`~enclaveml.fl.plan.certificate_nonce` of the plan digest, ``/attestation?nonce=N`` answers
evidence bound to :func:`~enclaveml.fl.plan.fresh_nonce` ``(plan, N)``, and with the simulation
TEE the plan is also part of the measured configuration. A party that derives the nonces from
the plan *it expects* accepts only that plan; the field ``"kind"`` keeps a vertical plan's digest
apart from any horizontal one.

One plan is one job, one of:

- ``psi``: align the parties' rows (``psi_mode`` ``"tee"`` or ``"ecdh"``);
- ``train``: train ``algorithm`` (``"boosting"`` or ``"logreg"``) with ``params`` on the aligned rows
  (boosting: with early stopping on the rows every party names ``valid_dataset``, if given);
- ``predict``: predict the rows of ``dataset`` (a name every party gave its rows) and hand the
  predictions to the label party; for boosting, with the server's part of a trained model,
  pinned by ``model_sha256`` (SHA-256 of its plaintext). Logistic regression has no server part.

``parties`` lists every party by name, the **label party first**: it holds the labels, is the
coordinator of cryptographic PSI and receives the predictions. ``credentials`` (party -> SHA-256
hex of the credential the operator issued it; ``enclaveml vfl plan --credentials REGISTRY``), when
given, pins who may speak for each party: the server accepts no other credentials, so the host
cannot take a passive party's place and receive what it would (residuals or gradients, from which
labels follow). Without it, whoever controls the server's registry file decides.
``psi_max_ids``, when given, is the most IDs a party may hold: in cryptographic PSI a party refuses
a blinded request with more points, which bounds how many guesses an untrusted relay can test
against a party's set in its one look per run. Plan digest: SHA-256 of the
canonical JSON of :meth:`VerticalPlan.to_dict` (sorted keys, no whitespace, UTF-8).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from enclaveml.errors import ConfigurationError
from enclaveml.fl.plan import _plain, check_credential_pins

__all__ = ["ALGORITHMS", "PSI_MODES", "TASKS", "VerticalPlan"]

_PLAN_VERSION = 1
_KIND = "enclaveml-vertical-fl"
TASKS = ("psi", "train", "predict")
PSI_MODES = ("tee", "ecdh")
ALGORITHMS = ("boosting", "logreg")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class VerticalPlan:
    """One job over the named parties; validated on construction (see the module docstring)."""

    task: str
    parties: tuple[str, ...]
    psi_mode: str = "tee"
    algorithm: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    dataset: str = "test"
    valid_dataset: str | None = None
    call_timeout_s: float = 600.0
    credentials: Mapping[str, str] = field(default_factory=dict)
    psi_max_ids: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parties", tuple(self.parties))
        if self.task not in TASKS:
            raise ConfigurationError(f"plan 'task' must be one of {', '.join(TASKS)}")
        if len(self.parties) < 2 or len(set(self.parties)) != len(self.parties):
            raise ConfigurationError(
                "plan 'parties' names two or more distinct parties, the label party first"
            )
        if not all(isinstance(p, str) and _NAME.fullmatch(p) for p in self.parties):
            raise ConfigurationError("party names are 1-64 letters, digits, '.', '_' or '-'")
        if self.psi_mode not in PSI_MODES:
            raise ConfigurationError(f"plan 'psi_mode' must be one of {', '.join(PSI_MODES)}")
        if self.task != "psi" and self.algorithm not in ALGORITHMS:
            raise ConfigurationError(f"plan 'algorithm' must be one of {', '.join(ALGORITHMS)}")
        if not isinstance(self.params, Mapping):
            raise ConfigurationError("plan 'params' must be a mapping of hyperparameters")
        pins_model = self.task == "predict" and self.algorithm == "boosting"
        if pins_model and not (
            isinstance(self.model_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.model_sha256)
        ):
            raise ConfigurationError(
                "a boosting predict plan pins the server's model: 'model_sha256' (64 hex)"
            )
        if not pins_model and self.model_sha256 is not None:
            raise ConfigurationError("'model_sha256' belongs to boosting predict plans only")
        if not isinstance(self.dataset, str) or not _NAME.fullmatch(self.dataset):
            raise ConfigurationError("plan 'dataset' must be a short name")
        if self.valid_dataset is not None and (
            self.task != "train"
            or not isinstance(self.valid_dataset, str)
            or not _NAME.fullmatch(self.valid_dataset)
        ):
            raise ConfigurationError(
                "plan 'valid_dataset' is the short name of a train plan's validation rows"
            )
        if not (isinstance(self.call_timeout_s, int | float) and 0 < self.call_timeout_s < math.inf):
            raise ConfigurationError("plan 'call_timeout_s' must be a positive number of seconds")
        if self.psi_max_ids is not None and not (
            isinstance(self.psi_max_ids, int)
            and not isinstance(self.psi_max_ids, bool)
            and self.psi_max_ids >= 1
        ):
            raise ConfigurationError("plan 'psi_max_ids' must be a positive integer")
        check_credential_pins(self.credentials, "credentials", max_name=64)
        if self.credentials and set(self.credentials) != set(self.parties):
            raise ConfigurationError("plan 'credentials' names one credential for each party, and no others")
        object.__setattr__(self, "credentials", dict(self.credentials))  # a copy the caller cannot change
        self.canonical_json()  # fails now, not at the first party, if something is not JSON

    @property
    def label_party(self) -> str:
        return self.parties[0]

    @property
    def passive_parties(self) -> Sequence[str]:
        return self.parties[1:]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data: what ``/v1/vfl/plan`` returns and the simulation TEE measures.

        ``credentials`` appears only when the plan pins them (earlier plans keep their digest).
        """
        data: dict[str, Any] = {
            "v": _PLAN_VERSION,
            "kind": _KIND,
            "task": self.task,
            "parties": list(self.parties),
            "psi_mode": self.psi_mode,
            "algorithm": self.algorithm,
            "params": _plain(self.params),
            "model_sha256": self.model_sha256,
            "dataset": self.dataset,
            "valid_dataset": self.valid_dataset,
            "call_timeout_s": float(self.call_timeout_s),
        }
        if self.credentials:
            data["credentials"] = dict(self.credentials)
        if self.psi_max_ids is not None:
            data["psi_max_ids"] = self.psi_max_ids
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerticalPlan:
        """Inverse of :meth:`to_dict` (the plan file every party received)."""
        if not isinstance(data, Mapping) or data.get("kind") != _KIND or data.get("v") != _PLAN_VERSION:
            raise ConfigurationError(
                f'a vertical plan is a mapping with "kind": "{_KIND}", "v": {_PLAN_VERSION}'
            )
        try:
            return cls(
                task=data["task"],
                parties=tuple(data["parties"]),
                psi_mode=data.get("psi_mode", "tee"),
                algorithm=data.get("algorithm"),
                params=data.get("params") or {},
                model_sha256=data.get("model_sha256"),
                dataset=data.get("dataset", "test"),
                valid_dataset=data.get("valid_dataset"),
                call_timeout_s=data.get("call_timeout_s", 600.0),
                credentials=data.get("credentials", {}),
                psi_max_ids=data.get("psi_max_ids"),
            )
        except KeyError as exc:
            raise ConfigurationError(f"vertical plan lacks the field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ConfigurationError(f"vertical plan field of the wrong type: {exc}") from None

    def canonical_json(self) -> bytes:
        try:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"vertical plan is not plain JSON data: {exc}") from exc
        return text.encode()

    @property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical_json`: the plan's identity in the RA-TLS nonces."""
        return hashlib.sha256(self.canonical_json()).digest()
