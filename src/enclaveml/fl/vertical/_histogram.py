"""Gradient histograms and the split search: the hot path of boosting, shared by both placements.

A histogram holds, for each node being grown, each feature and each bin code, the sums of the
rows' gradients and hessians. It is one ``complex128`` array of shape ``(nodes, features,
max_bin + 1)``: the real part sums gradients, the imaginary part hessians (float64 sums, as
xgboost's ``GradientPairPrecise``), and the last slot holds the rows whose value is missing.
Packing both sums in one complex number lets one ``np.add.at`` pass do the work of two.

:func:`build_histograms` runs where the codes are: in the TEE server (``histograms="tee"``) or at
each party (``"party"``); the same function on the same inputs gives the same bits, which is why
both placements grow the same trees. :func:`find_splits` runs on the server.

The split search follows xgboost's ``hist`` evaluator (``src/tree/hist/evaluate_splits.h``):

- gain of a child ``G^2 / (H + lambda)`` rounded to float32; loss change
  ``gain(left) + gain(right) - gain(parent)`` in float32; a candidate counts only when both
  children have hessian sums ``>= min_child_weight``;
- candidates of a feature are enumerated forward (missing values go right) over its bins, then, if
  the node has missing values for that feature, backward (missing values go left);
- ties go to the lowest feature index, then to the first candidate in that order (xgboost's
  ``SplitEntry::NeedReplace``); only a loss change ``> 0`` is a candidate at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enclaveml.fl.vertical import _kernels
from enclaveml.fl.vertical._kernels import Codes

__all__ = ["NodeSplits", "build_histograms", "find_splits", "leaf_weight", "node_gain"]

_F32 = np.float32


def build_histograms(
    codes: Codes,
    features: np.ndarray,
    gh: np.ndarray,
    rows: np.ndarray | None,
    counts: np.ndarray,
    stride: int,
) -> np.ndarray:
    """Histograms of the nodes whose rows are consecutive segments of ``rows``.

    ``features`` are the columns of ``codes`` to use; ``gh`` the per-row ``gradient + 1j *
    hessian``; ``rows`` the concatenated row indices of the nodes (``None`` for all rows, in order,
    as one node) with ``counts[k]`` rows for node ``k``. Returns ``(len(counts), len(features),
    stride)`` complex128. Every cell adds its rows in the order given (both kernels).
    """
    n_nodes, n_features = len(counts), len(features)
    if n_features == 0 or n_nodes == 0:
        return np.zeros((n_nodes, n_features, stride), dtype=np.complex128)
    if _kernels.compiled():
        all_rows = np.arange(len(gh)) if rows is None else rows
        flat = _kernels.histograms(codes, features, gh, all_rows, counts, stride)
        return flat.reshape(n_nodes, n_features, stride)
    codes_t = codes.by_feature
    out = np.zeros(n_nodes * n_features * stride, dtype=np.complex128)
    node_stride = n_features * stride
    if rows is None:
        gh_rows = gh
        key = np.empty(len(gh), dtype=np.intp)
        for j, f in enumerate(features):
            key[:] = codes_t[f]
            np.add.at(out[j * stride :], key, gh_rows)
    else:
        gh_rows = gh[rows]
        base = np.repeat(np.arange(n_nodes, dtype=np.intp) * node_stride, counts)
        key = np.empty(len(rows), dtype=np.intp)
        for j, f in enumerate(features):
            np.add(base, codes_t[f][rows], out=key)
            # The view starting at feature j keeps the key free of a per-feature offset.
            np.add.at(out[j * stride :], key, gh_rows)
    return out.reshape(n_nodes, n_features, stride)


def node_gain(stats: np.ndarray, reg_lambda: float) -> np.ndarray:
    """xgboost's ``CalcGain`` of nodes with ``stats`` (complex: grad + 1j*hess) as float32."""
    hess = stats.imag
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.square(stats.real) / (hess + reg_lambda)
    return np.where(hess > 0, gain, 0.0).astype(_F32)


def leaf_weight(stats: np.ndarray, reg_lambda: float, min_child_weight: float) -> np.ndarray:
    """xgboost's ``CalcWeight``: ``-G / (H + lambda)``, 0 below ``min_child_weight``; float32."""
    hess = stats.imag
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = -stats.real / (hess + reg_lambda)
    return np.where((hess < min_child_weight) | (hess <= 0), 0.0, weight).astype(_F32)


@dataclass(frozen=True)
class NodeSplits:
    """The best split of each node: ``feature`` is a position in the histogram's feature axis."""

    loss: np.ndarray  # float32; -inf or <= 0 where the node has no candidate
    feature: np.ndarray  # int64
    bin: np.ndarray  # int64, -1 .. n_bins - 1
    default_left: np.ndarray  # bool
    left: np.ndarray  # complex128 stats of the left child
    right: np.ndarray  # complex128 stats of the right child


def _scores(left: np.ndarray, right: np.ndarray, reg_lambda: float, min_child_weight: float) -> np.ndarray:
    """``gain(left) + gain(right)`` in float64 (candidates of nodes x features x bins); -inf where a
    child is lighter than ``min_child_weight``. A cheap first pass: see :func:`find_splits`."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        score: np.ndarray = np.square(left.real)
        denominator = left.imag + reg_lambda
        score /= denominator
        if min_child_weight <= 0:
            score[left.imag <= 0] = 0
        other = np.square(right.real)
        np.add(right.imag, reg_lambda, out=denominator)
        other /= denominator
        if min_child_weight <= 0:
            other[right.imag <= 0] = 0
        score += other
    light = left.imag < min_child_weight
    light |= right.imag < min_child_weight
    score[light] = -np.inf
    return score


def find_splits(
    hist: np.ndarray,
    parent: np.ndarray,
    n_bins: np.ndarray,
    allowed: np.ndarray | None,
    reg_lambda: float,
    min_child_weight: float,
) -> NodeSplits:
    """The best split of each node of ``hist`` (nodes x features x (max_bin + 1), complex).

    ``parent`` holds each node's own stats, ``n_bins`` each feature's bin count and ``allowed``
    (nodes x features, optional) the features each node may use (column sampling).

    Two passes, for speed: every candidate is scored in float64, then the candidates within a
    relative 1e-6 of each node's best (more than float32 rounding can reorder) get xgboost's exact
    float32 loss change, and the winner is picked by xgboost's rules among those.
    """
    n_nodes, n_features, stride = hist.shape
    n_real = stride - 1
    if _kernels.compiled():
        return _compiled_splits(hist, parent, n_bins, allowed, reg_lambda, min_child_weight)
    present = hist[:, :, :n_real]
    left = np.cumsum(present, axis=2)
    right = parent[:, None, None] - left
    forward = _scores(left, right, reg_lambda, min_child_weight)
    past_end = np.arange(n_real)[None, :] >= n_bins[:, None]  # (features, bins)
    forward[:, past_end] = -np.inf
    if allowed is not None:
        forward[~allowed] = -np.inf
    missing = hist[:, :, n_real] != 0
    candidates = forward
    backward_right = None
    if missing.any():
        # Backward: bins from the last one down accumulate on the right, missing values go left.
        # Summing from the top (the padding past n_bins is zeros) keeps xgboost's order of sums.
        # Position j holds the candidate whose right side starts at bin n_real - 1 - j.
        backward_right = np.cumsum(present[:, :, ::-1], axis=2)
        backward = _scores(
            parent[:, None, None] - backward_right, backward_right, reg_lambda, min_child_weight
        )
        backward[:, past_end[:, ::-1]] = -np.inf
        backward[~missing] = -np.inf
        if allowed is not None:
            backward[~allowed] = -np.inf
        candidates = np.concatenate([forward, backward], axis=2)
    width = candidates.shape[2]
    flat = candidates.reshape(n_nodes, n_features * width)
    top = flat[np.arange(n_nodes), np.argmax(flat, axis=1)]
    threshold = np.where(np.isfinite(top), top - 1e-6 * np.abs(top), np.inf)
    nodes, index = np.nonzero(flat >= threshold[:, None])
    feature, position = np.divmod(index, width)
    is_backward = position >= n_real
    left_stats = left[nodes, feature, np.minimum(position, n_real - 1)]
    if backward_right is not None and is_backward.any():
        back = backward_right[nodes, feature, np.where(is_backward, position - n_real, 0)]
        left_stats = np.where(is_backward, parent[nodes] - back, left_stats)
        right_stats = np.where(is_backward, back, parent[nodes] - left_stats)
    else:
        right_stats = parent[nodes] - left_stats
    loss = node_gain(left_stats, reg_lambda) + node_gain(right_stats, reg_lambda)
    loss -= node_gain(parent, reg_lambda)[nodes]
    # xgboost's order: the largest float32 loss change, then the first candidate in enumeration
    # order (lowest feature, forward bins, then backward ones).
    order = np.lexsort((index, -loss, nodes))
    first = order[np.r_[True, nodes[order][1:] != nodes[order][:-1]]] if len(order) else order
    out_loss = np.full(n_nodes, -np.inf, dtype=_F32)
    out_feature = np.zeros(n_nodes, dtype=np.int64)
    out_bin = np.zeros(n_nodes, dtype=np.int64)
    out_default_left = np.zeros(n_nodes, dtype=np.bool_)
    out_left = np.zeros(n_nodes, dtype=np.complex128)
    out_right = np.zeros(n_nodes, dtype=np.complex128)
    k = nodes[first]
    out_loss[k] = loss[first]
    out_feature[k] = feature[first]
    out_bin[k] = np.where(is_backward[first], 2 * n_real - 2 - position[first], position[first])
    out_default_left[k] = is_backward[first]
    out_left[k] = left_stats[first]
    out_right[k] = right_stats[first]
    return NodeSplits(out_loss, out_feature, out_bin, out_default_left, out_left, out_right)


def _compiled_splits(
    hist: np.ndarray,
    parent: np.ndarray,
    n_bins: np.ndarray,
    allowed: np.ndarray | None,
    reg_lambda: float,
    min_child_weight: float,
) -> NodeSplits:
    n_nodes, n_features, stride = hist.shape
    n_real = stride - 1
    if allowed is None:
        allowed = np.ones((n_nodes, n_features), dtype=np.bool_)
    loss, feature, position, left, right, found = _kernels.scan(
        hist, parent, n_bins, allowed, reg_lambda, min_child_weight
    )
    loss[~found] = -np.inf
    backward = position >= n_real
    bins = np.where(backward, position - n_real - 1, position)
    return NodeSplits(loss, feature, bins, backward & found, left, right)
