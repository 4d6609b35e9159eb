"""Storage for one round's updates as the rows of one matrix, and the BLAS path that uses it.

Why: updates decoded into separate arrays are summed one memory stream at a time (well under the
memory bandwidth on our machines); updates that are rows of one matrix are summed by one BLAS
matrix-vector product, which reads many rows at once, at the speed of a plain
``weights @ stacked``, without the copy that stacking separate arrays costs. The aggregator
allocates one :class:`UpdateMatrix` per round (capacity: the enrolled clients), decodes (or
decrypts, ``decrypt_into``) each upload straight into ``row(i)``, and builds
``ClientUpdate(weights=matrix.row(i), ...)``. The strategies detect the layout by themselves
(:func:`matrix_runs`, :func:`whole_row_sum`); any other weights keep working.

Layout of a row: the arrays of the template in order, each starting at a multiple of 64 bytes
(a cache line), native byte order, C order; the row length is a multiple of 64 bytes; padding
is zero.

Detection never reads memory it does not own: a strided view is built only over arrays that are
views of one root ndarray, so every byte it spans lies inside that array's buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategy import Weights

__all__ = ["UpdateMatrix", "flat", "matrix_runs", "whole_row_sum"]

_ALIGN = 64
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class UpdateMatrix:
    """``capacity`` rows, each holding one set of weights shaped like ``template`` (zero-filled)."""

    def __init__(self, template: Weights, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError("UpdateMatrix capacity must be a positive number of clients")
        self._layout: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for array in template:
            dtype = np.dtype(array.dtype).newbyteorder("=")
            self._layout.append((offset, dtype, tuple(array.shape)))
            offset += -(-array.size * dtype.itemsize // _ALIGN) * _ALIGN
        self.row_bytes = max(offset, _ALIGN)
        self.capacity = capacity
        # np.zeros maps fresh zero pages lazily: rows that are never written cost no memory.
        self._data = np.zeros((capacity, self.row_bytes), dtype=np.uint8)

    def row(self, index: int) -> Weights:
        """Writable arrays of row ``index``, in the template's shapes and dtypes."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"row {index} of an UpdateMatrix with {self.capacity} rows")
        row = self._data[index]
        weights: Weights = []
        for offset, dtype, shape in self._layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            weights.append(row[offset : offset + nbytes].view(dtype).reshape(shape))
        return weights


def flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view (a copy only for non-contiguous input)."""
    return np.asarray(array).reshape(-1)


def whole_row_sum(rows: Sequence[Weights], coeffs: np.ndarray, like: Weights) -> Weights | None:
    """``Σ coeffs[i] · rows[i]`` with one BLAS call per run of rows; None if the layout does not allow it.

    Applies when every array has one BLAS dtype, each row's arrays lie in order at the same
    offsets of one buffer with at most alignment padding between them, and every row belongs to
    a run of evenly spaced rows (an :class:`UpdateMatrix`, possibly with rejected rows left out).
    Padding enters the product but only its own outputs, which are dropped. One call instead of
    one per array matters: a multi-threaded BLAS call has a fixed cost, and models have hundreds
    of small arrays.
    """
    if len(rows) < 2 or not like or like[0].dtype not in _BLAS_DTYPES:
        return None
    dtype = like[0].dtype
    if any(g.dtype != dtype for g in like):
        return None
    spans, owners, offsets = [], [], None
    for row in rows:
        span = _row_span(row, dtype)
        if span is None or (offsets is not None and span[1] != offsets):
            return None
        spans.append(span[0])
        owners.append(_owner(flat(row[0])))
        offsets = span[1]
    runs = matrix_runs(spans, owners)
    if offsets is None or sum(stop - start for start, stop, _ in runs) != len(rows):
        return None
    c = coeffs.astype(dtype)
    out = np.empty(spans[0].size, dtype=dtype)
    for k, (start, stop, matrix) in enumerate(runs):
        if k:
            out += np.matmul(c[start:stop], matrix)
        else:
            np.matmul(c[start:stop], matrix, out=out)
    return [out[o : o + g.size] for o, g in zip(offsets, like, strict=True)]


def _row_span(arrays: Weights, dtype: np.dtype) -> tuple[np.ndarray, list[int]] | None:
    """A read-only flat view from a row's first array to the end of its last, and each array's offset."""
    flats = [flat(a) for a in arrays]
    if not flats or any(f.dtype != dtype or not f.flags.c_contiguous for f in flats):
        return None
    owner = _owner(flats[0])
    if any(_owner(f) is not owner for f in flats):
        return None
    base = _address(flats[0])
    end, offsets = base, []
    for f in flats:
        address = _address(f)
        if address < end or address - end > _ALIGN or (address - base) % dtype.itemsize:
            return None
        offsets.append((address - base) // dtype.itemsize)
        end = address + f.nbytes
    view = as_strided(flats[0], shape=((end - base) // dtype.itemsize,), strides=(dtype.itemsize,))
    view.flags.writeable = False
    return view, offsets


def matrix_runs(
    flats: list[np.ndarray], owners: list[np.ndarray] | None = None
) -> list[tuple[int, int, np.ndarray]]:
    """Maximal runs ``[start, stop)`` of at least two consecutive 1-D arrays that are evenly
    spaced rows of one allocation, each as a read-only (rows x size) view for one BLAS call.

    ``owners`` (default: found from each array's ``base``) are the arrays whose buffers hold them.
    """
    n = len(flats)
    if n < 2 or flats[0].dtype not in _BLAS_DTYPES:
        return []
    first = flats[0]
    owners = owners if owners is not None else [_owner(x) for x in flats]
    addresses = [_address(x) for x in flats]

    def fits(i: int, k: int, step: int) -> bool:
        x = flats[k]
        return (
            x.dtype == first.dtype
            and x.size == first.size
            and x.flags.c_contiguous
            and owners[k] is owners[i]
            and addresses[k] - addresses[i] == step
        )

    runs: list[tuple[int, int, np.ndarray]] = []
    i = 0
    while i < n - 1:
        step = addresses[i + 1] - addresses[i]
        usable = step >= first.nbytes and step % first.itemsize == 0 and flats[i].flags.c_contiguous
        if not usable or not fits(i, i + 1, step):
            i += 1
            continue
        k = i + 1
        while k + 1 < n and fits(k, k + 1, step):
            k += 1
        view = as_strided(flats[i], shape=(k + 1 - i, first.size), strides=(step, first.itemsize))
        view.flags.writeable = False
        runs.append((i, k + 1, view))
        i = k + 1
    return runs


def _owner(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])
