"""Integer and bool arrays of a model (counters, masks, indices): one robust rule for every strategy.

Why a rule of their own: the update rules (:mod:`enclaveml.fl.validation`) measure the change of
the *float* arrays only, since a counter such as BatchNorm's ``num_batches_tracked`` is not a model
direction and its change (the local step count) would dwarf that of the weights. Averaged like
the weights, such an array is then unbounded: one client, with its own value or a lie about
``num_examples``, moves the mean anywhere in the dtype's range (2**62 in an int64 counter, a whole
mask flipped), and the float64 mean of int64 values loses every bit beyond 2**53 and wraps to
-2**63 when cast back from 2**63.

So every built-in strategy takes, for each integer or bool array, the coordinate-wise median of
the accepted updates (:func:`with_discrete_medians`), whatever it does with the float arrays:

* each client counts once: example counts are claims, and a weighted median would let a client
  that claims most of the examples choose the value;
* the median stays within the range of the honest values as long as fewer than half of the
  clients are malicious, and needs no scale (a bound on a counter's change would need one, and
  none fits every model);
* it is computed in the array's own dtype, without a float: the middle value for an odd count,
  the midpoint of the two middle values for an even one, rounded half to even (what ``np.rint``
  of the float median gives where a float is exact), so the result always lies between two
  values clients sent, never overflows and keeps every bit of an int64;
* for bools that is the majority; a tie gives False (0.5 rounds to even).

Integer arrays are small in the models we aggregate; the work is one sort of (clients x block)
per block, in the kernels' threads, and nothing at all for an all-float model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from enclaveml.fl.strategies._kernels import _STACK_ELEMENTS, Job, _run, _stack_job
from enclaveml.fl.strategies._update_matrix import MatrixRows, flat
from enclaveml.fl.strategy import Weights

__all__ = ["discrete_medians", "is_discrete", "with_discrete_medians"]


def is_discrete(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` are aggregated by :func:`discrete_medians` (integers, bools)."""
    return dtype.kind in "iub"


def with_discrete_medians(values: Sequence[np.ndarray], rows: Sequence[Weights], like: Weights) -> Weights:
    """``values`` (a strategy's result, one array per array of ``like``) with each integer or bool
    array replaced by its coordinate-wise median over ``rows``; float arrays are left as they are."""
    medians = discrete_medians(rows, like)
    return [medians.get(j, value) for j, value in enumerate(values)]


def discrete_medians(rows: Sequence[Weights], like: Weights) -> dict[int, np.ndarray]:
    """For each integer or bool array ``j`` of ``like``: the flat coordinate-wise median over
    ``rows`` in that dtype (native byte order). Empty for an all-float model.

    Given a :class:`MatrixRows`, each integer or bool region is one reduction over the region's
    part of every row (no per-array work); plain lists are reduced array by array.
    """
    groups: list[tuple[np.dtype, list[np.ndarray], tuple[tuple[int, int, int], ...]]] = []
    if isinstance(rows, MatrixRows):
        for region in rows.regions:
            if is_discrete(region.dtype):
                flats = [rows.region_row(i, region) for i in range(len(rows))]
                groups.append((region.dtype, flats, region.members))
    else:
        for j, ref in enumerate(like):
            if is_discrete(ref.dtype):
                dtype = np.dtype(ref.dtype).newbyteorder("=")
                groups.append((dtype, [flat(r[j]) for r in rows], ((j, 0, ref.size),)))
    if not groups:
        return {}
    n = len(rows)
    if n == 0:
        raise ValueError("discrete_medians needs at least one row")
    block = max(256, _STACK_ELEMENTS // n)
    medians: dict[int, np.ndarray] = {}
    jobs: list[tuple[int, Job]] = []
    for dtype, flats, members in groups:
        size = flats[0].size
        out = np.empty(size, dtype=dtype)
        reducer = _majority if dtype.kind == "b" else _integer_median
        for a in range(0, size, block):
            b = min(size, a + block)
            jobs.append(((b - a) * n, _stack_job(flats, out, a, b, block, reducer)))
        for j, start, count in members:
            medians[j] = out[start : start + count]
    _run(jobs)
    return medians


def _integer_median(stacked: np.ndarray, out: np.ndarray) -> None:
    stacked.sort(axis=0)
    n = stacked.shape[0]
    low, high = stacked[(n - 1) // 2], stacked[n // 2]
    if n % 2:
        np.copyto(out, low)
        return
    # floor((low + high) / 2) without the sum, which may overflow: halves, plus the carry of the
    # two low bits; then, for a midpoint x.5 (sum odd), the even neighbour, as np.rint would.
    np.right_shift(low, 1, out=out)
    out += high >> 1
    out += low & high & 1
    out += (low ^ high) & out & 1


def _majority(stacked: np.ndarray, out: np.ndarray) -> None:
    # count_nonzero reads any non-zero byte as True and the result is a canonical bool.
    np.greater(np.count_nonzero(stacked, axis=0), stacked.shape[0] // 2, out=out)
