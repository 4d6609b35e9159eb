"""The uploads of the open round, inside the TEE: each one copied once into its row of a matrix.

Why: a round of 100 clients x 10M float32 parameters is 4 GB. Kept as separate arrays, it has to
be read once more to validate and aggregated one array at a time (2-4x slower than BLAS on a
matrix); stacked into a matrix at round close, it would be copied and held twice. So each upload
goes, as it arrives, straight into a free row of an
:class:`~enclaveml.fl.strategies.UpdateMatrix` allocated for the round (capacity: the enrolled
clients; untouched rows cost no memory), and in the same pass the squared norm of its change
from the round's global model is computed. At round close the validator judges norms only
(:func:`~enclaveml.fl.validation.judge_norms`) and the strategy receives the accepted rows as a
:class:`~enclaveml.fl.strategies._round_updates.RoundUpdates`: FedAvg is then one BLAS call per
run of consecutive rows, on memory already laid out.

What is kept per upload: example count, metrics, the squared delta norm and, for an upload already
known to be invalid (layout, dtype), the rejection reason instead of a row; one found invalid in
its copy (NaN/Inf, a bool byte other than 0/1) keeps its row, unread, until the round ends. A
rejected or revoked upload's row never enters a :class:`RoundUpdates`; a revoked client's row is
reused.
Every round starts with a fresh :class:`RoundUploads` (and matrix), so nothing from an earlier round
is ever aggregated again; the matrix is freed with the last reference to the closed round.

Locking: :class:`~enclaveml.fl.aggregator.Aggregator` calls every method under its lock except
:meth:`RoundUploads.write`, the copy, which runs outside it on a row reserved for one client (so
uploads are copied in parallel and status calls do not wait for them). Only committed uploads count
for closing the round; one still being copied when the round closes is refused at commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from enclaveml.fl.strategies._kernels import cast_like, delta_sq_norms, ingest
from enclaveml.fl.strategies._round_updates import RoundUpdates
from enclaveml.fl.strategies._update_matrix import MatrixRows, UpdateMatrix
from enclaveml.fl.strategy import Weights
from enclaveml.fl.validation import bool_problem, judge_norms, nonfinite_reason

__all__ = ["ClosedRound", "RoundUploads", "Upload", "take_over", "weighted_metrics"]


@dataclass
class Upload:
    """One client's upload for the open round (``row`` None: rejected on arrival, no data kept)."""

    client_id: str
    row: tuple[UpdateMatrix, int] | None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    sq_norm: float = 0.0
    reason: str | None = None
    committed: bool = False


@dataclass(frozen=True)
class ClosedRound:
    """The verdict on a round's uploads: accepted ones (in row order) and reasons for the rest."""

    accepted: RoundUpdates | None
    rejected: dict[str, str]


class RoundUploads:
    """The open round's uploads, judged against ``global_weights`` (the round's starting model)."""

    def __init__(self, global_weights: Weights) -> None:
        self.global_weights = global_weights
        self._chunks: list[UpdateMatrix] = []
        self._free: list[tuple[UpdateMatrix, int]] = []
        self._uploads: dict[str, Upload] = {}
        self.committed: dict[str, Upload] = {}

    def __contains__(self, client_id: object) -> bool:
        """Whether ``client_id`` has an upload here, committed or still being copied."""
        return client_id in self._uploads

    def holds(self, upload: Upload) -> bool:
        """Whether ``upload`` is still this round's (not revoked, round not closed)."""
        return self._uploads.get(upload.client_id) is upload

    def reserve(self, client_id: str, reason: str | None, capacity: int) -> Upload:
        """Claim a row for ``client_id`` (none if ``reason`` already rejects the upload).

        The first row of a round allocates a matrix of ``capacity`` rows (the enrolled clients);
        more clients than that (enrolled since) get another matrix of the missing rows.
        """
        row = None
        if reason is None:
            if not self._free:
                size = max(1, capacity - sum(m.capacity for m in self._chunks))
                matrix = UpdateMatrix(self.global_weights, size)
                self._chunks.append(matrix)
                self._free = [(matrix, i) for i in range(size - 1, -1, -1)]
            row = self._free.pop()
        upload = Upload(client_id, row, reason=reason)
        self._uploads[client_id] = upload
        return upload

    def write(self, upload: Upload, weights: Weights) -> None:
        """Copy ``weights`` into the upload's row and measure its change (outside the lock)."""
        if upload.row is None:
            return
        matrix, index = upload.row
        row = matrix.row(index)
        upload.sq_norm = ingest(weights, row, self.global_weights)
        # On the copy, not the caller's arrays, which could still change under us.
        upload.reason = bool_problem(row) if np.isfinite(upload.sq_norm) else nonfinite_reason(row)

    def commit(self, upload: Upload, num_examples: int, metrics: Mapping[str, float]) -> int:
        """Count ``upload`` in the round; returns how many uploads are committed now."""
        upload.num_examples, upload.metrics, upload.committed = num_examples, dict(metrics), True
        self.committed[upload.client_id] = upload
        return len(self.committed)

    def discard(self, client_id: str, *, copy_done: bool = False) -> None:
        """Forget ``client_id``'s upload (revocation, a failed copy).

        Its row is free again once nobody writes to it: a committed upload's copy is done, and so
        is the caller's own failed one (``copy_done``); a revoked upload still being copied keeps
        its row out of use until the round ends.
        """
        upload = self._uploads.pop(client_id, None)
        self.committed.pop(client_id, None)
        if upload is not None and upload.row is not None and (upload.committed or copy_done):
            self._free.append(upload.row)

    def close(self, *, max_norm: float | None, norm_outlier_factor: float | None) -> ClosedRound:
        """Validate the committed uploads (rules on norms only) and select the accepted rows.

        Changes nothing here: the aggregator starts a new :class:`RoundUploads` once the round
        is over, or closes this one again if aggregation failed (see :meth:`refresh_norms`).
        """
        rejected = {u.client_id: u.reason for u in self.committed.values() if u.reason is not None}
        # Row order: consecutive rows of one matrix are one BLAS operand.
        candidates = sorted(
            (u for u in self.committed.values() if u.reason is None),
            key=lambda u: (self._chunks.index(u.row[0]), u.row[1]) if u.row else (0, 0),
        )
        verdicts = judge_norms(
            np.array([u.sq_norm for u in candidates], dtype=np.float64),
            max_norm=max_norm,
            norm_outlier_factor=norm_outlier_factor,
        )
        accepted: list[Upload] = []
        for upload, verdict in zip(candidates, verdicts, strict=True):
            if verdict is None:
                accepted.append(upload)
            else:
                rejected[upload.client_id] = verdict
        if not accepted:
            return ClosedRound(None, rejected)
        rows = MatrixRows([u.row for u in accepted if u.row is not None])
        updates = RoundUpdates(
            rows,
            [u.client_id for u in accepted],
            [u.num_examples for u in accepted],
            [u.metrics for u in accepted],
            np.array([u.sq_norm for u in accepted], dtype=np.float64),
            owned=True,
        )
        return ClosedRound(updates, rejected)

    def refresh_norms(self) -> None:
        """Measure the committed rows again: a strategy that failed may have clipped some in place."""
        for upload in self.committed.values():
            if upload.row is not None and upload.reason is None:
                matrix, index = upload.row
                upload.sq_norm = float(delta_sq_norms(self.global_weights, [matrix.row(index)])[0])


def take_over(weights: Sequence[np.ndarray], previous: Weights, rows: RoundUpdates | None) -> Weights:
    """A strategy's output (already in the model's shapes) as the new global model.

    Arrays are taken over without a copy (at 10M parameters a copy costs a third of aggregating
    10 clients) when they are writable arrays of their own buffer, of the model's dtype, sharing
    no memory with the previous model or the round's rows; anything else is copied. A strategy
    must therefore not keep and later change the arrays it returns.

    Values of another dtype returned for an integer or bool array are rounded (floats), and
    refused (ValueError: the round's attempt fails, the model stays) where the dtype cannot hold them, as in
    :func:`~enclaveml.fl.strategies._kernels.cast_like`: a plain cast would truncate, and wrap
    2**63 to -2**63 (a strategy of one's own that averages a counter gets there).
    """
    owned = [
        isinstance(w, np.ndarray)
        and _owns_buffer(w)
        and w.dtype == old.dtype
        and w.flags.writeable
        and not np.may_share_memory(w, old)
        for w, old in zip(weights, previous, strict=True)
    ]
    if rows is not None and rows.rows.shares_memory(
        [w for w, mine in zip(weights, owned, strict=True) if mine]
    ):
        owned = [False] * len(owned)  # a strategy that hands back rows: copy everything
    layout = zip(weights, previous, owned, strict=True)
    return [w.reshape(old.shape) if mine else _copy_as(w, old) for w, old, mine in layout]


def _copy_as(value: np.ndarray, old: np.ndarray) -> np.ndarray:
    """A copy of ``value`` in ``old``'s dtype; any other dtype for an integer or bool array goes
    through :func:`cast_like` (rounding floats, refusing what the dtype cannot hold: an int64
    2**32 + 7 must not become 7 in an int32 array)."""
    if old.dtype.kind in "iub" and np.asarray(value).dtype != old.dtype:
        return cast_like([value], [old])[0]  # rounded and range-checked, never wrapped
    return np.array(value, dtype=old.dtype)


def _owns_buffer(array: np.ndarray) -> bool:
    """Whether ``array`` is (a view of) an ndarray with memory of its own, not of bytes, mmap..."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base is None


def weighted_metrics(counts: Sequence[int], metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of each metric every accepted client reported (finite values only)."""
    if not metrics:
        return {}
    names = set.intersection(*(set(m) for m in metrics))
    total = sum(counts)
    means = {n: sum(m[n] * c for m, c in zip(metrics, counts, strict=True)) / total for n in sorted(names)}
    return {n: v for n, v in means.items() if math.isfinite(v)}
