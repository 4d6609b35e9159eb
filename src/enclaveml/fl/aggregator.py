"""The horizontal-FL aggregator core: enrolment, rounds, validation, aggregation and checkpoints.

:class:`Aggregator` does no networking. Transports drive it: :class:`~enclaveml.fl.client.InProcessConnection`
calls it directly (tests, simulating many clients in one process) and :mod:`enclaveml.fl.server`
exposes it over RA-TLS; the strategy and every rule below are the same code in both.

A round, as the aggregator runs it inside the TEE:

1. round ``r`` opens; each enrolled client fetches the global model and the strategy's
   ``configure_train`` config, trains locally and uploads *weights* for round ``r``; each upload
   is checked for layout and dtypes and copied into its row of the round's matrix as it arrives,
   with the norm of its change (:mod:`enclaveml.fl._round`);
2. the round closes when every enrolled client has uploaded, or when ``round_timeout_s`` has
   passed since it opened and at least ``min_clients`` have (clients that dropped out are
   simply not waited for); with fewer than ``min_clients`` it keeps waiting past the deadline;
3. the validation rules (:mod:`enclaveml.fl.validation`: layout, dtypes, NaN/Inf, norm bound,
   norm outliers) reject updates, which are recorded with the reason and left out;
4. if at least ``min_clients`` updates were accepted, the strategy aggregates their rows into the
   next global model and a sealed checkpoint is written; otherwise the attempt is recorded as
   failed, the model stays as it was and round ``r`` runs again (``attempt`` + 1).

Only the aggregate ever leaves: individual updates live in this object until their round
closes and are never returned by any method. Credentials are random tokens handed to each
client by the operator at enrolment; only their SHA-256 is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl._checkpoint import Checkpoint, CheckpointStore, RoundRecord
from enclaveml.fl._errors import (
    DuplicateUpdateError,
    InvalidUpdateError,
    NotEnrolledError,
    RoundMismatchError,
    TrainingFinishedError,
)
from enclaveml.fl._round import RoundUploads, take_over, weighted_metrics
from enclaveml.fl._wire import MAX_EXAMPLES, ModelMessage, check_metrics
from enclaveml.fl.plan import TrainingPlan, token_sha256
from enclaveml.fl.strategies._round_updates import RoundUpdates
from enclaveml.fl.strategy import Strategy, Weights
from enclaveml.fl.validation import structure_problem, validation_options

__all__ = ["Aggregator", "RoundRecord", "token_sha256"]

_log = logging.getLogger(__name__)


class Aggregator:
    """One federated training run. Thread-safe: transports call it from many threads at once.

    ``checkpoints`` (optional) seals the state after every completed round; when it already
    holds a checkpoint of the same plan, the run resumes from it (``resumed_from`` says which
    round). ``participants`` (client id -> credential SHA-256 hex) goes into the plan: those
    clients are enrolled now and no others can be (:mod:`enclaveml.fl.plan`). ``clock`` is
    injectable so tests can drive round timeouts.
    """

    def __init__(
        self,
        strategy: Strategy,
        initial_weights: Weights,
        *,
        rounds: int,
        min_clients: int,
        round_timeout_s: float = 600.0,
        model_id: str = "model",
        validation: Mapping[str, Any] | None = None,
        participants: Mapping[str, str] | None = None,
        checkpoints: CheckpointStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigurationError("strategy must be an enclaveml.fl.strategy.Strategy")
        # In the wire's byte order (little-endian), as every decoded upload is: big-endian initial
        # weights (an .npz written elsewhere) would otherwise reject every upload as "wrong dtype".
        weights = [_little_endian_copy(w) for w in initial_weights]
        if not weights:
            raise ConfigurationError("initial_weights must hold at least one array")
        self.plan = TrainingPlan.create(
            strategy,
            weights,
            rounds=rounds,
            min_clients=min_clients,
            round_timeout_s=round_timeout_s,
            model_id=model_id,
            validation=validation,
            participants=participants,
        )
        self._strategy = strategy
        self._max_norm, self._outlier_factor = validation_options(validation or {})
        self._layout = [(w.shape, w.dtype) for w in weights]
        self._weights = weights
        self._checkpoints = checkpoints
        self._clock = clock
        self._cond = threading.Condition()
        self._credentials: dict[bytes, str] = {}
        self._completed = 0
        self._attempt = 1
        self._history: list[RoundRecord] = []
        self._opened_at = clock()
        self.resumed_from: int | None = None
        if checkpoints is not None:
            self._resume(checkpoints)
        self._round = RoundUploads(self._weights)
        for client_id, digest in self.plan.participants.items():
            self.enrol_hashed(client_id, bytes.fromhex(digest))

    # --- enrolment (operator) ------------------------------------------------------------------

    def enrol(self, client_id: str) -> str:
        """Enrol ``client_id`` and return its new credential; hand it to the client, it is not kept."""
        if self.plan.participants:
            raise ConfigurationError(
                "the plan names its participants and their credentials: none can be issued here"
            )
        token = secrets.token_urlsafe(32)
        self.enrol_hashed(client_id, token_sha256(token))
        return token

    def enrol_hashed(self, client_id: str, credential_sha256: bytes) -> None:
        """Enrol ``client_id`` with a credential the operator issued elsewhere (its SHA-256).

        When the plan names its participants, only a participant with its own credential (again,
        e.g. after :meth:`revoke`) can be enrolled.
        """
        if not isinstance(client_id, str) or not client_id or len(client_id) > 128:
            raise ConfigurationError("client ids are non-empty strings of at most 128 characters")
        if not isinstance(credential_sha256, bytes) or len(credential_sha256) != 32:
            raise ConfigurationError("credential hashes are 32-byte SHA-256 digests")
        pinned = self.plan.participants
        if pinned and pinned.get(client_id) != credential_sha256.hex():
            raise ConfigurationError(
                f"the plan names its participants: {client_id!r} with this credential is not one of them"
            )
        with self._cond:
            if self._credentials.get(credential_sha256, client_id) != client_id:
                raise ConfigurationError("this credential is already enrolled for another client")
            self._revoke_locked(client_id)
            self._credentials[credential_sha256] = client_id

    def revoke(self, client_id: str) -> None:
        """Forget a client's credential; its upload for the open round, if any, is dropped too."""
        with self._cond:
            self._revoke_locked(client_id)
            self._round.discard(client_id)

    def _revoke_locked(self, client_id: str) -> None:
        for digest in [d for d, c in self._credentials.items() if c == client_id]:
            del self._credentials[digest]

    @property
    def enrolled(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._credentials.values())

    def authenticate(self, token: str) -> str:
        """The client id of a credential; NotEnrolledError for anything else (no hint which part failed)."""
        # A dict lookup on the hash: timing may tell how a guess's *hash* compares with stored
        # hashes, which does not help to find a 256-bit random credential. No lock: one dict read
        # is atomic, and transports call this on their event loop, which must not wait for a round
        # that is being aggregated and sealed.
        client_id = self._credentials.get(token_sha256(token))
        if client_id is not None:
            return client_id
        raise NotEnrolledError("unknown client credential: ask the operator to enrol this client")

    # --- rounds (participants) -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._completed >= self.plan.rounds

    @property
    def completed_rounds(self) -> int:
        with self._cond:
            return self._completed

    def has_uploaded(self, client_id: str) -> bool:
        """Whether the open round already holds ``client_id``'s update.

        Lock-free (one dict read), for transports that poll on an event loop; a stale answer
        costs one more poll.
        """
        return client_id in self._round.committed

    def check_upload(self, client_id: str, round_: int) -> None:
        """Raise what :meth:`submit` would for ``client_id`` and ``round_`` before reading any weights.

        For transports that receive the update body after this: a client whose upload would be
        refused anyway (wrong round, already uploaded, training over) is refused before it sends
        a model-sized body. :meth:`submit` checks again; this is only the early answer.
        """
        with self._cond:
            current = self._check_open_locked(client_id, round_)
            if client_id in self._round:
                raise DuplicateUpdateError(f"client {client_id!r} already uploaded for round {current}")

    def global_model(self, client_id: str | None = None) -> ModelMessage:
        """The aggregate and the config for the open round; ``uploaded`` is about ``client_id``."""
        with self._cond:
            self._tick_locked()
            finished = self._completed >= self.plan.rounds
            round_ = self._completed if finished else self._completed + 1
            config = {} if finished else dict(self._strategy.configure_train(round_, self._weights))
            return ModelMessage(
                round=round_,
                completed_rounds=self._completed,
                finished=finished,
                uploaded=client_id in self._round.committed,
                config=config,
                plan_sha256=self.plan.digest,
                weights=[w.copy() for w in self._weights],
            )

    def submit(
        self,
        client_id: str,
        round_: int,
        weights: Weights,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Accept ``client_id``'s update for ``round_``: copied into the round's matrix now, judged
        together with the others when the round closes.

        The arrays are copied (the caller may reuse them). Returns how many updates the round
        holds now. Raises TrainingFinishedError, RoundMismatchError (also if the round closed
        while this update was being copied), DuplicateUpdateError or NotEnrolledError, and
        InvalidUpdateError for an example count or metric no float can hold, or more metrics than
        :data:`~enclaveml.fl._wire.MAX_METRICS` (names of at most 64 characters); never because of
        the weights' values or layout, which only get the update rejected at round close.
        """
        if (
            not isinstance(num_examples, int)
            or isinstance(num_examples, bool)
            or not 0 < num_examples <= MAX_EXAMPLES
        ):
            raise InvalidUpdateError(f"num_examples must be an integer from 1 to {MAX_EXAMPLES}")
        checked = check_metrics(metrics or {})
        reason = structure_problem(self._weights, weights)  # the layout never changes: no lock
        with self._cond:
            current = self._check_open_locked(client_id, round_)
            uploads = self._round
            if client_id in uploads:
                raise DuplicateUpdateError(f"client {client_id!r} already uploaded for round {current}")
            capacity = len(set(self._credentials.values()))
            upload = uploads.reserve(client_id, reason, capacity)
        try:
            uploads.write(upload, weights)  # the copy, outside the lock
        except BaseException:
            with self._cond:
                if uploads.holds(upload):
                    uploads.discard(client_id, copy_done=True)
            raise
        with self._cond:
            if self._round is not uploads or not uploads.holds(upload):
                current = self._check_open_locked(client_id, round_)
                raise RoundMismatchError(
                    f"round {round_} closed while this update was being stored", current=current
                )
            # An upload already known to be rejected keeps no metrics: they would never be used.
            count = uploads.commit(upload, num_examples, {} if upload.reason else checked)
            self._tick_locked()
            return count

    def _check_open_locked(self, client_id: str, round_: int) -> int:
        """The open round, if ``client_id`` may upload for ``round_`` now; else the matching error."""
        if client_id not in self._credentials.values():
            raise NotEnrolledError(f"client {client_id!r} is not enrolled")
        if self._completed >= self.plan.rounds:
            raise TrainingFinishedError(f"all {self.plan.rounds} rounds are complete")
        current = self._completed + 1
        if round_ != current:
            message = f"update is for round {round_}, but round {current} is open"
            raise RoundMismatchError(message, current=current)
        return current

    def poll(self) -> bool:
        """Close the open round if its deadline passed with enough updates; True if one closed."""
        with self._cond:
            before = (self._completed, self._attempt)
            self._tick_locked()
            return (self._completed, self._attempt) != before

    def wait_for_work(self, client_id: str, timeout: float) -> bool:
        """Block until ``client_id`` has something to do (train for an open round, or stop).

        Returns False on timeout. Also drives round deadlines while it waits.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._tick_locked()
                if self._completed >= self.plan.rounds or client_id not in self._round.committed:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))

    # --- state for operators and status pages ---------------------------------------------------

    @property
    def history(self) -> list[RoundRecord]:
        """Every attempt at every round, with accepted and rejected client ids (operator view)."""
        with self._cond:
            return list(self._history)

    def status(self, client_id: str | None = None) -> dict[str, Any]:
        """Counts only (no client ids but the caller's own): safe to show to any participant."""
        with self._cond:
            self._tick_locked()
            finished = self._completed >= self.plan.rounds
            left = self.plan.round_timeout_s - (self._clock() - self._opened_at)
            out: dict[str, Any] = {
                "round": self._completed if finished else self._completed + 1,
                "attempt": self._attempt,
                "completed_rounds": self._completed,
                "rounds": self.plan.rounds,
                "finished": finished,
                "enrolled": len(set(self._credentials.values())),
                "uploads": len(self._round.committed),
                "min_clients": self.plan.min_clients,
                "seconds_left": None if finished else max(0.0, round(left, 3)),
                "resumed_from": self.resumed_from,
                "history": [
                    {
                        "round": r.round,
                        "attempt": r.attempt,
                        "status": r.status,
                        "accepted": len(r.accepted),
                        "rejected": len(r.rejected),
                        # No example totals or example-weighted metrics: with two clients each
                        # would learn the other's data size and local metrics (operator view only).
                    }
                    for r in self._history
                ],
            }
            if client_id is not None:
                own = {"id": client_id, "uploaded": client_id in self._round.committed}
                out["client"] = {**own, **self._own(client_id)}
            return out

    def _own(self, client_id: str) -> dict[str, Any]:
        """The caller's fate in the last attempt it took part in (never anyone else's)."""
        for record in reversed(self._history):
            if client_id in record.accepted:
                return {"last_round": record.round, "last_result": "accepted"}
            if client_id in record.rejected:
                return {"last_round": record.round, "last_result": f"rejected: {record.rejected[client_id]}"}
        return {}

    # --- closing a round ------------------------------------------------------------------------

    def _tick_locked(self) -> None:
        committed = self._round.committed
        if self._completed >= self.plan.rounds or len(committed) < self.plan.min_clients:
            return
        enrolled = set(self._credentials.values())
        if enrolled <= committed.keys():
            self._close_locked("all")
        elif self._clock() - self._opened_at >= self.plan.round_timeout_s:
            self._close_locked("timeout")

    def _close_locked(self, closed_by: str) -> None:
        round_ = self._completed + 1
        uploads = self._round
        verdict = uploads.close(max_norm=self._max_norm, norm_outlier_factor=self._outlier_factor)
        accepted = verdict.accepted
        ids = () if accepted is None else tuple(sorted(accepted.client_ids))
        record = RoundRecord(
            round=round_,
            attempt=self._attempt,
            status="completed" if len(ids) >= self.plan.min_clients else "failed",
            closed_by=closed_by,
            accepted=ids,
            rejected=dict(verdict.rejected),
            num_examples=0 if accepted is None else sum(accepted.num_examples),
            metrics={} if accepted is None else weighted_metrics(accepted.num_examples, accepted.metrics),
        )
        if verdict.rejected:
            _log.warning("round %d: rejected updates from %s", round_, verdict.rejected)
        if record.status == "completed" and accepted is not None:
            try:
                new_weights = self._strategy.aggregate_train(round_, self._weights, accepted)
                self._weights = self._conform(new_weights, accepted)
            except Exception as exc:  # noqa: BLE001 - e.g. Krum given fewer updates than it needs
                # Deterministic for these updates: closing again would fail again, for every
                # client's call, forever. The attempt fails and a fresh one opens instead.
                name = self._strategy.name
                _log.error("round %d: strategy %s failed: %s", round_, name, type(exc).__name__)
                record = dataclasses.replace(record, status="failed")
            except BaseException:
                uploads.refresh_norms()  # interrupted: the round stays open and is closed again later
                raise
        if record.status == "completed":
            self._completed, self._attempt = round_, 1
        else:
            _log.warning("round %d attempt %d: %d valid updates", round_, self._attempt, len(ids))
            self._attempt += 1
        del accepted, verdict, uploads  # the round's matrix goes with the last reference to its rows
        self._history.append(record)
        self._round = RoundUploads(self._weights)
        self._opened_at = self._clock()
        if record.status == "completed" and self._checkpoints is not None:
            try:
                self._checkpoints.save(self._checkpoint())
            except Exception as exc:  # noqa: BLE001 - e.g. the key broker is down
                # The round is done either way; failing the call of the client that happened to
                # close it would only stop that client. The next completed round saves again.
                _log.error("round %d: checkpoint not saved: %s", round_, type(exc).__name__)
        self._cond.notify_all()

    def _conform(self, weights: Sequence[np.ndarray], rows: RoundUpdates | None = None) -> Weights:
        """The strategy's output in the initial layout; a strategy that changes it is a bug."""
        if len(weights) != len(self._layout) or any(
            np.shape(w) != shape for w, (shape, _) in zip(weights, self._layout, strict=False)
        ):
            raise ConfigurationError(f"strategy {self._strategy.name!r} returned weights of another layout")
        return take_over(weights, self._weights, rows)

    # --- checkpoints ----------------------------------------------------------------------------

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            plan_sha256=self.plan.rules_digest,  # the participants may change between restarts
            completed_rounds=self._completed,
            weights=self._weights,
            strategy_state=self._strategy.state(),
            history=tuple(self._history),
        )

    def _resume(self, store: CheckpointStore) -> None:
        checkpoint = store.load(self.plan.rules_digest)
        if checkpoint is None:
            return
        self._weights = self._conform(checkpoint.weights)
        self._strategy.load_state(checkpoint.strategy_state)
        self._completed = checkpoint.completed_rounds
        self._history = list(checkpoint.history)
        self.resumed_from = checkpoint.completed_rounds
        _log.info("resumed after round %d from %s", self._completed, store.path)


def _little_endian_copy(value: Any) -> np.ndarray:
    array = np.asarray(value)
    return np.array(array, dtype=array.dtype.newbyteorder("<"), copy=True)
