"""Sealed aggregator checkpoints: the training state after each completed round, encrypted for a KEK.

The host that stores checkpoints is outside the TEE, so a checkpoint is a sealed artifact
(:func:`enclaveml.crypto.seal_bytes`) under a key-encryption key that only the attested
aggregator obtains (a :class:`~enclaveml.crypto.KeyHandle`, or released by the key broker).
Tampering anywhere raises :class:`~enclaveml.errors.DecryptionError` on resume. What sealing
cannot prevent is *rollback*: the host may put back an older, valid checkpoint; the run then
resumes from that earlier round (documented in ``docs/federated.md``).

File: ``<directory>/checkpoint.sealed``, replaced atomically (temporary sibling, fsync, rename).
Sealed header: content type ``application/vnd.enclaveml.fl-checkpoint+cbor`` and metadata
``{"completed_rounds": decimal, "plan_sha256": hex}`` (authenticated; readable without a key, so an
operator can see how far a run got). ``plan_sha256`` is the plan's ``rules_digest`` (its digest
without the participant list), so a run resumes under a plan whose credentials were replaced.
Payload, canonical CBOR::

    {"v": 1, "plan_sha256": bstr(32), "completed_rounds": uint, "weights": weights,
     "strategy_state": {* tstr => tensor}, "history": [* round-record]}
    round-record = RoundRecord.to_dict()

``weights`` and ``tensor`` are those of :mod:`enclaveml.fl._wire`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cbor2
import numpy as np

from enclaveml._files import write_atomically
from enclaveml.crypto import KeyHandle, read_header, seal_bytes, unseal_bytes
from enclaveml.crypto.keys import DataKeyUnwrapper
from enclaveml.errors import ConfigurationError, DecryptionError
from enclaveml.fl._wire import weights_from_item, weights_item
from enclaveml.fl.strategy import Weights

__all__ = ["CHECKPOINT_CONTENT_TYPE", "Checkpoint", "CheckpointStore", "KeyReleaser", "RoundRecord"]

CHECKPOINT_CONTENT_TYPE = "application/vnd.enclaveml.fl-checkpoint+cbor"
_FILE = "checkpoint.sealed"
_VERSION = 1


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one attempt at a round; kept inside the TEE and in checkpoints.

    ``status`` is ``"completed"`` (aggregated) or ``"failed"`` (fewer than ``min_clients`` updates
    passed validation: the global model is unchanged and the round is run again). ``rejected``
    maps client ids to the validator's reason. ``closed_by`` is ``"all"`` (every enrolled client
    uploaded) or ``"timeout"``.
    """

    round: int
    attempt: int
    status: str
    closed_by: str
    accepted: tuple[str, ...]
    rejected: Mapping[str, str]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "attempt": self.attempt,
            "status": self.status,
            "closed_by": self.closed_by,
            "accepted": list(self.accepted),
            "rejected": dict(self.rejected),
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        return cls(
            round=int(data["round"]),
            attempt=int(data["attempt"]),
            status=str(data["status"]),
            closed_by=str(data["closed_by"]),
            accepted=tuple(str(c) for c in data["accepted"]),
            rejected={str(k): str(v) for k, v in data["rejected"].items()},
            num_examples=int(data["num_examples"]),
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
        )


@dataclass(frozen=True)
class Checkpoint:
    """The aggregator's durable state between rounds (never the updates of a round in progress)."""

    plan_sha256: bytes
    completed_rounds: int
    weights: Weights
    strategy_state: Mapping[str, np.ndarray]
    history: tuple[RoundRecord, ...]

    def encode(self) -> bytes:
        names = sorted(self.strategy_state)
        body = {
            "v": _VERSION,
            "plan_sha256": self.plan_sha256,
            "completed_rounds": self.completed_rounds,
            "weights": weights_item(self.weights),
            "strategy_state": dict(
                zip(names, weights_item([self.strategy_state[n] for n in names]), strict=True)
            ),
            "history": [record.to_dict() for record in self.history],
        }
        return bytes(cbor2.dumps(body, canonical=True))

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        # Authenticated by unsealing, so written by an aggregator: malformed means a bug, not an attack.
        body = cbor2.loads(data)
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            raise ConfigurationError(f"checkpoint format version {body.get('v')!r} is not {_VERSION}")
        state = body["strategy_state"]
        names = sorted(state)
        arrays = weights_from_item([state[n] for n in names])
        return cls(
            plan_sha256=body["plan_sha256"],
            completed_rounds=body["completed_rounds"],
            weights=weights_from_item(body["weights"]),
            strategy_state=dict(zip(names, arrays, strict=True)),
            history=tuple(RoundRecord.from_dict(r) for r in body["history"]),
        )


@runtime_checkable
class KeyReleaser(DataKeyUnwrapper, Protocol):
    """What a key broker client offers: release the latest KEK version, and unwrap any version."""

    def release(self, key_id: str, version: int | None = None) -> KeyHandle: ...


class CheckpointStore:
    """Sealed checkpoints in one directory, under a local key handle or a broker-released key.

    With a :class:`KeyHandle` it seals and unseals with that key. With a broker client
    (:class:`~enclaveml.kms.KeyBrokerClient`) it releases the latest version of ``key_id`` on the
    first save, and unseals any version through the broker, so a KEK rotated between runs works.
    """

    def __init__(
        self, directory: str | os.PathLike[str], key: KeyHandle | KeyReleaser, *, key_id: str = ""
    ) -> None:
        self.directory = Path(directory)
        if isinstance(key, KeyHandle):
            self.key_id = key_id or key.key_id
            if self.key_id != key.key_id:
                raise ConfigurationError(f"key_id {key_id!r} differs from the handle's {key.key_id!r}")
            self._sealing: KeyHandle | None = key
        elif isinstance(key, KeyReleaser):
            if not key_id:
                raise ConfigurationError("a broker-backed checkpoint store needs the key_id to release")
            self.key_id, self._sealing = key_id, None
        else:
            raise ConfigurationError("checkpoint key must be a KeyHandle or a key broker client")
        self._key = key
        self.path = self.directory / _FILE

    def save(self, checkpoint: Checkpoint) -> None:
        """Seal and atomically replace the checkpoint; durable once this returns."""
        if self._sealing is None:
            assert isinstance(self._key, KeyReleaser)
            self._sealing = self._key.release(self.key_id)
        metadata = {
            "completed_rounds": str(checkpoint.completed_rounds),
            "plan_sha256": checkpoint.plan_sha256.hex(),
        }
        blob = seal_bytes(
            checkpoint.encode(),
            wrapper=self._sealing,
            key_id=self.key_id,
            content_type=CHECKPOINT_CONTENT_TYPE,
            metadata=metadata,
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, blob)  # durable: data and the rename are fsynced

    def load(self, plan_sha256: bytes) -> Checkpoint | None:
        """The last checkpoint of this plan, or None when there is none yet.

        Raises DecryptionError when the file was altered (or sealed under another key), and
        ConfigurationError when it belongs to a different training plan.
        """
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"cannot read checkpoint {self.path}: {exc.strerror}") from exc
        header = read_header(blob)
        if header.content_type != CHECKPOINT_CONTENT_TYPE:
            raise DecryptionError("checkpoint header is not an enclaveml FL checkpoint")
        if header.metadata.get("plan_sha256") != plan_sha256.hex():
            raise ConfigurationError(
                f"checkpoint {self.path} belongs to training plan {header.metadata.get('plan_sha256')}, "
                f"not {plan_sha256.hex()}: move it away to start a new run"
            )
        checkpoint = Checkpoint.decode(unseal_bytes(blob, unwrapper=self._key))
        if checkpoint.plan_sha256 != plan_sha256:
            raise DecryptionError("checkpoint payload and header disagree")
        return checkpoint
