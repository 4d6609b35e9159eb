"""Growing one tree depthwise, the way xgboost's ``hist`` updater does, wherever the codes are.

The grower holds the rows of each node and asks a :class:`HistogramSource` for two things only:
histograms of some nodes, and which rows of a node go left at a chosen split. The TEE placement
answers both from the codes the parties uploaded (:class:`CodesSource`); the party placement
asks the parties (``_boost_sources.PartySource``). Everything else (split search, subtraction trick,
leaf values, sampling) is here, once.

Per level, as in xgboost: every open node gets its best split (:func:`find_splits`); it is taken
when its loss change is ``> 1e-6`` (xgboost's ``kRtEps``), ``>= gamma`` and both children have a
non-zero hessian sum; the children's values are ``learning_rate * weight`` as float32. Only the
smaller child of each split (by rows) gets its histogram built, its sibling's is the parent's
minus it. Nodes at ``max_depth`` are leaves without being evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from enclaveml.fl.vertical import _kernels
from enclaveml.fl.vertical._binning import goes_left
from enclaveml.fl.vertical._boost_model import Tree
from enclaveml.fl.vertical._histogram import build_histograms, find_splits, leaf_weight
from enclaveml.fl.vertical._kernels import Codes

__all__ = ["OBJECTIVES", "CodesSource", "GrowParams", "HistogramSource", "Objective", "grow_tree"]

_F32 = np.float32
_RT_EPS = _F32(1e-6)


class HistogramSource(Protocol):
    """Where the bin codes are: the grower's only way to see them."""

    def begin_tree(self, gh: np.ndarray, features: np.ndarray) -> None:
        """A new tree over the global ``features`` (sorted) with per-row ``grad + 1j*hess``."""

    def histograms(self, rows: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
        """``(len(counts), len(features), max_bin + 1)`` complex histograms (see _histogram)."""

    def partition(
        self, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, expected_left: np.ndarray
    ) -> np.ndarray:
        """Which of ``rows`` go left; node ``k`` owns ``counts[k]`` consecutive rows and splits at
        ``splits[k] = (global feature, bin, default_left)``; ``expected_left[k]`` is the left
        child's gradient and hessian sum that the histograms promised (to check an answer)."""


class CodesSource:
    """A source over codes in this process (the TEE placement: every party's codes)."""

    def __init__(self, codes: Codes, max_bin: int) -> None:
        self.codes = codes
        self.stride = max_bin + 1
        self.missing = max_bin
        self._gh = np.empty(0, dtype=np.complex128)
        self._features = np.empty(0, dtype=np.int64)

    def begin_tree(self, gh: np.ndarray, features: np.ndarray) -> None:
        self._gh, self._features = gh, features

    def histograms(self, rows: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
        return build_histograms(self.codes, self._features, self._gh, rows, counts, self.stride)

    def partition(
        self, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, expected_left: np.ndarray
    ) -> np.ndarray:
        return partition_rows(self.codes, rows, counts, splits, self.missing)


def partition_rows(
    codes: Codes, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, missing: int
) -> np.ndarray:
    """:meth:`HistogramSource.partition` over local codes (``splits`` name columns of ``codes``)."""
    if _kernels.compiled():
        return _kernels.left_masks(codes, rows, counts, splits, missing)
    left = np.empty(len(rows), dtype=np.bool_)
    start = 0
    for (feature, bin_index, default_left), count in zip(splits.tolist(), counts.tolist(), strict=True):
        segment = rows[start : start + count]
        left[start : start + count] = goes_left(
            codes.by_feature[feature][segment], bin_index, bool(default_left), missing
        )
        start += count
    return left


@dataclass(frozen=True)
class Objective:
    """A loss: float32 gradients from float32 margins, as xgboost computes them."""

    name: str
    gradients: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    transform: Callable[[np.ndarray], np.ndarray]
    base_margin: Callable[[float], float]
    default_metric: str


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    # xgboost's common::Sigmoid: exponent capped at 88.7 so expf never overflows.
    x = np.minimum(-margin.astype(_F32), _F32(88.7))
    return (_F32(1) / (np.exp(x) + _F32(1) + _F32(1e-16))).astype(_F32)


def _logistic_gradients(margin: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _sigmoid(margin)
    return p - label, np.maximum(p * (_F32(1) - p), _F32(1e-16))


def _squared_gradients(margin: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (margin - label).astype(_F32), np.ones(len(margin), dtype=_F32)


def _logit(p: float) -> float:
    p32 = _F32(p)
    return float(-np.log(_F32(1) / p32 - _F32(1), dtype=_F32))


OBJECTIVES: dict[str, Objective] = {
    "binary:logistic": Objective("binary:logistic", _logistic_gradients, _sigmoid, _logit, "logloss"),
    "reg:squarederror": Objective(
        "reg:squarederror", _squared_gradients, lambda m: m.astype(_F32), lambda b: float(_F32(b)), "rmse"
    ),
}


@dataclass(frozen=True)
class GrowParams:
    """The per-tree hyperparameters, with xgboost's names and meanings."""

    max_depth: int
    learning_rate: float
    reg_lambda: float
    gamma: float
    min_child_weight: float
    colsample_bylevel: float
    colsample_bynode: float


def _sample(rng: np.random.Generator, features: np.ndarray, fraction: float) -> np.ndarray:
    """xgboost's ColumnSampler: ``max(1, int(fraction * n))`` of ``features``, kept sorted."""
    if fraction >= 1.0:
        return features
    keep = max(1, int(fraction * len(features)))
    return np.sort(rng.choice(features, size=keep, replace=False))


def _allowed(
    rng: np.random.Generator, features: np.ndarray, n_nodes: int, params: GrowParams
) -> np.ndarray | None:
    """Which of the tree's features each node of a level may split on (None: all)."""
    if params.colsample_bylevel >= 1.0 and params.colsample_bynode >= 1.0:
        return None
    level = _sample(rng, features, params.colsample_bylevel)
    allowed = np.zeros((n_nodes, len(features)), dtype=np.bool_)
    for k in range(n_nodes):
        allowed[k, np.searchsorted(features, _sample(rng, level, params.colsample_bynode))] = True
    return allowed


class _Nodes:
    """The tree under construction, as growing lists."""

    def __init__(self) -> None:
        self.feature: list[int] = []
        self.bin: list[int] = []
        self.default_left: list[bool] = []
        self.left: list[int] = []
        self.right: list[int] = []
        self.value: list[float] = []
        self.gain: list[float] = []

    def add(self, value: float) -> int:
        self.feature.append(-1)
        self.bin.append(0)
        self.default_left.append(False)
        self.left.append(-1)
        self.right.append(-1)
        self.value.append(value)
        self.gain.append(0.0)
        return len(self.feature) - 1

    def split(self, node: int, feature: int, bin_index: int, default_left: bool, gain: float) -> None:
        self.feature[node], self.bin[node], self.default_left[node] = feature, bin_index, default_left
        self.gain[node] = gain
        self.left[node] = self.add(self.value[node])
        self.right[node] = self.add(self.value[node])
        self.value[node] = 0.0

    def tree(self) -> Tree:
        return Tree(
            feature=np.array(self.feature, dtype=np.int32),
            bin=np.array(self.bin, dtype=np.int32),
            default_left=np.array(self.default_left, dtype=np.uint8),
            left=np.array(self.left, dtype=np.int32),
            right=np.array(self.right, dtype=np.int32),
            value=np.array(self.value, dtype=np.float32),
            gain=np.array(self.gain, dtype=np.float32),
        )


def grow_tree(
    source: HistogramSource,
    gh: np.ndarray,
    features: np.ndarray,
    n_bins: np.ndarray,
    params: GrowParams,
    rng: np.random.Generator,
) -> tuple[Tree, list[tuple[int, np.ndarray | None]]]:
    """Grow one tree; returns it and each leaf's rows (``None``: all rows, a one-leaf tree).

    ``features`` are the tree's global features (sorted), ``n_bins`` their bin counts.
    """
    eta = _F32(params.learning_rate)
    lam, mcw = params.reg_lambda, params.min_child_weight
    n_rows = len(gh)
    source.begin_tree(gh, features)
    nodes = _Nodes()
    root_stats = np.array([gh.sum()])
    root = nodes.add(float(leaf_weight(root_stats, lam, mcw)[0] * eta))
    open_ids = [root]
    open_rows: list[np.ndarray | None] = [None]
    stats = root_stats
    leaves: list[tuple[int, np.ndarray | None]] = []
    if params.max_depth == 0 or len(features) == 0:
        return nodes.tree(), [(root, None)]
    hist = source.histograms(None, np.array([n_rows], dtype=np.int64))
    for depth in range(params.max_depth):
        allowed = _allowed(rng, features, len(open_ids), params)
        best = find_splits(hist, stats, n_bins, allowed, lam, mcw)
        ok = (
            (best.loss > _RT_EPS)
            & (best.loss >= _F32(params.gamma))
            & (best.left.imag != 0)
            & (best.right.imag != 0)
        )
        split_at = np.flatnonzero(ok)
        leaves.extend((open_ids[k], open_rows[k]) for k in np.flatnonzero(~ok))
        if not len(split_at):
            return nodes.tree(), leaves
        node_rows: list[np.ndarray] = [_all_if_none(open_rows[k], n_rows) for k in split_at]
        counts = np.array([len(r) for r in node_rows], dtype=np.int64)
        rows = node_rows[0] if len(node_rows) == 1 else np.concatenate(node_rows)
        triples = np.stack(
            [features[best.feature[split_at]], best.bin[split_at], best.default_left[split_at]], axis=1
        ).astype(np.int64)
        if isinstance(source, CodesSource) and _kernels.compiled():
            ordered, n_left = _kernels.partition_split(source.codes, rows, counts, triples, source.missing)
        else:
            mask = source.partition(rows, counts, triples, best.left[split_at])
            ordered, n_left = _split(rows, counts, mask)
        child_ids: list[int] = []
        child_rows: list[np.ndarray | None] = []
        left_w = leaf_weight(best.left[split_at], lam, mcw) * eta
        right_w = leaf_weight(best.right[split_at], lam, mcw) * eta
        start = 0
        for i, k in enumerate(split_at.tolist()):
            node = open_ids[k]
            middle, end = start + int(n_left[i]), start + int(counts[i])
            nodes.split(
                node, int(triples[i, 0]), int(triples[i, 1]), bool(triples[i, 2]), float(best.loss[k])
            )
            nodes.value[nodes.left[node]] = float(left_w[i])
            nodes.value[nodes.right[node]] = float(right_w[i])
            child_ids += [nodes.left[node], nodes.right[node]]
            child_rows += [ordered[start:middle], ordered[middle:end]]
            start = end
        if depth + 1 == params.max_depth:
            leaves.extend(zip(child_ids, child_rows, strict=True))
            return nodes.tree(), leaves
        stats = np.stack([best.left[split_at], best.right[split_at]], axis=1).ravel()
        parents = hist if len(split_at) == len(open_ids) else hist[split_at]
        hist, order = _children_histograms(source, parents, child_rows)
        open_ids = [child_ids[i] for i in order]
        open_rows = [child_rows[i] for i in order]
        stats = stats[order]
    return nodes.tree(), leaves


def _split(rows: np.ndarray, counts: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each node's rows reordered left ones first (stable), and how many go left per node."""
    if _kernels.compiled():
        return _kernels.split_nodes(rows, counts, mask)
    ordered = np.empty_like(rows)
    n_left = np.empty(len(counts), dtype=np.int64)
    start = 0
    for k, count in enumerate(counts.tolist()):
        segment, left = rows[start : start + count], mask[start : start + count]
        chosen = segment[left]
        n_left[k] = len(chosen)
        ordered[start : start + len(chosen)] = chosen
        ordered[start + len(chosen) : start + count] = segment[~left]
        start += count
    return ordered, n_left


def _all_if_none(rows: np.ndarray | None, n_rows: int) -> np.ndarray:
    return np.arange(n_rows) if rows is None else rows


def _children_histograms(
    source: HistogramSource, parents: np.ndarray, child_rows: list[np.ndarray | None]
) -> tuple[np.ndarray, list[int]]:
    """Histograms of the children (left, right per parent): the smaller of each pair is built, its
    sibling is the parent's minus it. Returned in the order (built ones, then the others) given."""
    sizes = np.array([len(r) if r is not None else 0 for r in child_rows]).reshape(-1, 2)
    pairs = np.arange(len(parents))
    built = 2 * pairs + (sizes[:, 1] < sizes[:, 0])
    derived = 2 * pairs + (sizes[:, 1] >= sizes[:, 0])
    built_rows = [_all_if_none(child_rows[i], 0) for i in built.tolist()]
    counts = np.array([len(r) for r in built_rows], dtype=np.int64)
    small = source.histograms(np.concatenate(built_rows), counts)
    hist = np.empty((2 * len(parents), *parents.shape[1:]), dtype=np.complex128)
    hist[: len(parents)] = small
    np.subtract(parents, small, out=hist[len(parents) :])
    return hist, built.tolist() + derived.tolist()
