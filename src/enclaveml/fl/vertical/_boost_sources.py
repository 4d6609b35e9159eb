"""The server's side of the party placement: histograms and partitions asked of the parties.

Every answer is checked before it is used, and a bad one raises :class:`ProtocolError` naming the
party and the method, never a value: shapes and dtypes, finiteness, and consistency with what the
server already knows from the labels. A party's histogram of a node must add up (over each
feature's bins, missing slot included) to the node's gradient and hessian sums; the rows a party
sends left at a split must add up to the split's left sums. A party cannot pass off made-up
histograms or partitions that the gradients contradict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from enclaveml.fl.vertical._channel import PartyChannel, call_all
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import ProtocolError

__all__ = ["PartySource", "check_array", "unpack_bits"]

_TOL = 1e-6


def check_array(
    party: str, method: str, answer: Payload, key: str, dtype: type, shape: tuple[int, ...]
) -> np.ndarray:
    """``answer[key]`` if it is an array of ``dtype`` and ``shape``; :class:`ProtocolError` otherwise."""
    value = answer.get(key)
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype) or value.shape != shape:
        raise ProtocolError(f"party {party!r} answered {method!r} with a malformed {key!r}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ProtocolError(f"party {party!r} answered {method!r} with non-finite {key!r}")
    return value


def unpack_bits(party: str, method: str, packed: np.ndarray, n_bits: int) -> np.ndarray:
    """``np.packbits`` undone along the last axis; padding bits must be zero."""
    bits = np.unpackbits(packed, axis=-1).astype(np.bool_)
    if bits[..., n_bits:].any():
        raise ProtocolError(f"party {party!r} answered {method!r} with bits past the last row")
    return bits[..., :n_bits]


def _close(actual: np.ndarray, expected: np.ndarray) -> bool:
    scale = np.abs(expected.real) + np.abs(expected.imag) + 1.0
    return bool((np.abs(actual - expected) <= _TOL * scale).all())


class PartySource:
    """A :class:`~enclaveml.fl.vertical._boost_grower.HistogramSource` whose codes stay with the parties."""

    def __init__(
        self, channels: Sequence[PartyChannel], n_features: Sequence[int], max_bin: int, n_rows: int
    ) -> None:
        self.channels = list(channels)
        self.offsets = np.concatenate([[0], np.cumsum(n_features, dtype=np.int64)])
        self.stride = max_bin + 1
        self.n_rows = n_rows
        self.tree = -1
        self._gh = np.empty(0, dtype=np.complex128)
        self._local: list[np.ndarray] = []

    def _owner(self, feature: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, feature, side="right") - 1

    def begin_tree(self, gh: np.ndarray, features: np.ndarray) -> None:
        self.tree += 1
        self._gh = gh
        owner = self._owner(features)
        self._local = [features[owner == p] - self.offsets[p] for p in range(len(self.channels))]
        active = [p for p, local in enumerate(self._local) if len(local)]
        payloads = [
            {"tree": self.tree, "grad": gh.real.astype(np.float32), "hess": gh.imag.astype(np.float32),
             "features": self._local[p]}
            for p in active
        ]  # fmt: skip
        call_all([self.channels[p] for p in active], "boost.gradients", payloads)

    def histograms(self, rows: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
        active = [p for p, local in enumerate(self._local) if len(local)]
        request: Payload = {"tree": self.tree, "counts": counts.astype(np.int64)}
        if rows is not None:
            request["rows"] = rows.astype(np.int32)
        answers = call_all([self.channels[p] for p in active], "boost.histograms", request)
        n_nodes = len(counts)
        expected = self._node_sums(rows, counts)
        parts = []
        for p, answer in zip(active, answers, strict=True):
            name = self.channels[p].name
            shape = (n_nodes, len(self._local[p]), self.stride, 2)
            hist = check_array(name, "boost.histograms", answer, "hist", np.float64, shape)
            hist = np.ascontiguousarray(hist).view(np.complex128).reshape(shape[:3])
            if (hist.imag < 0).any() or not _close(hist.sum(axis=2), expected[:, None]):
                raise ProtocolError(f"party {name!r} sent histograms that do not add up to the node sums")
            parts.append(hist)
        return np.concatenate(parts, axis=1)

    def _node_sums(self, rows: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
        if rows is None:
            return np.array([self._gh.sum()])
        sums = np.zeros(len(counts), dtype=np.complex128)
        nonempty = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        if nonempty.any():
            sums[nonempty] = np.add.reduceat(self._gh[rows], starts[nonempty])
        return sums

    def partition(
        self, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, expected_left: np.ndarray
    ) -> np.ndarray:
        # Nodes grouped by the party owning their split (node order kept within a party), so each
        # party's rows are one slice of ``grouped``.
        owner = self._owner(splits[:, 0])
        order = np.argsort(owner, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        grouped = np.concatenate([rows[starts[k] : starts[k + 1]] for k in order.tolist()])
        bounds = np.concatenate([[0], np.cumsum(counts[order])])
        parties = sorted(set(owner.tolist()))
        spans, payloads = [], []
        for p in parties:
            nodes = order[owner[order] == p]
            first = int(np.flatnonzero(order == nodes[0])[0])
            last = first + len(nodes)
            local = splits[nodes].copy()
            local[:, 0] -= self.offsets[p]
            mine = grouped[bounds[first] : bounds[last]]
            spans.append((first, last))
            payloads.append(
                {"tree": self.tree, "rows": mine.astype(np.int32), "counts": counts[nodes], "splits": local}
            )
        answers = call_all([self.channels[p] for p in parties], "boost.partition", payloads)
        grouped_left = np.empty(len(rows), dtype=np.bool_)
        for p, (first, last), answer in zip(parties, spans, answers, strict=True):
            name = self.channels[p].name
            a, b = int(bounds[first]), int(bounds[last])
            packed = check_array(name, "boost.partition", answer, "left", np.uint8, ((b - a + 7) // 8,))
            bits = unpack_bits(name, "boost.partition", packed, b - a)
            # The rows a party sends left must carry the left sums its histograms promised.
            node_starts = bounds[first:last] - a
            sums = np.zeros(last - first, dtype=np.complex128)
            nonempty = counts[order[first:last]] > 0
            if nonempty.any():
                gh_left = np.where(bits, self._gh[grouped[a:b]], 0)
                sums[nonempty] = np.add.reduceat(gh_left, node_starts[nonempty])
            if not np.isclose(sums, expected_left[order[first:last]], rtol=_TOL, atol=_TOL).all():
                raise ProtocolError(f"party {name!r} sent a partition that contradicts the histograms")
            grouped_left[a:b] = bits
        left = np.empty(len(rows), dtype=np.bool_)
        for j, k in enumerate(order.tolist()):
            left[starts[k] : starts[k + 1]] = grouped_left[bounds[j] : bounds[j + 1]]
        return left
