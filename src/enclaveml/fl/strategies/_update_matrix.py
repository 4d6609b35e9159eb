"""Storage for one round's updates as the rows of one matrix, and selections of those rows.

Why: updates decoded into separate arrays are summed one memory stream at a time (well under the
memory bandwidth on our machines); updates that are rows of one matrix are summed by one BLAS
matrix-vector product, which reads many rows at once, at the speed of a plain
``weights @ stacked``, without the copy that stacking separate arrays costs. The aggregator
(:mod:`enclaveml.fl._round`) allocates one :class:`UpdateMatrix` per round (capacity: the enrolled
clients), copies each upload straight into a free row as it arrives, and hands the strategy the
accepted rows as a :class:`MatrixRows` selection (inside a
:class:`~enclaveml.fl.strategies._round_updates.RoundUpdates`), which the kernels aggregate with
one BLAS call per dtype region per run of consecutive rows.

Layout of a row: one *region* per dtype of the template, in order of first appearance; inside a
region the arrays of that dtype lie back to back in template order, flat, C order, native byte
order; each region starts at a multiple of 64 bytes (a cache line) and the row length is a multiple
of 64 bytes; padding is zero. A float32 model with a few int64 counters is thus one float32 region
(one BLAS call for all its arrays) and one small int64 region.

Rows built by hand (:meth:`UpdateMatrix.row` filled by the caller, passed as plain lists) are still
recognised by address (:func:`matrix_runs`, :func:`whole_row_sum`). Detection never reads memory it
does not own: a strided view is built only over arrays that are views of one root ndarray, so every
byte it spans lies inside that array's buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from numpy.lib.stride_tricks import as_strided

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategy import Weights

__all__ = ["MatrixRows", "Region", "UpdateMatrix", "flat", "matrix_runs", "whole_row_sum"]

_ALIGN = 64
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Region:
    """The arrays of one dtype in a row: ``members`` are (array index, element offset, size)."""

    dtype: np.dtype
    offset: int  # bytes from the start of the row
    size: int  # elements
    members: tuple[tuple[int, int, int], ...]


class UpdateMatrix:
    """``capacity`` rows, each holding one set of weights shaped like ``template`` (zero-filled)."""

    def __init__(self, template: Weights, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError("UpdateMatrix capacity must be a positive number of clients")
        arrays = [np.asarray(a) for a in template]
        dtypes: list[np.dtype] = []
        for a in arrays:
            dtype = np.dtype(a.dtype).newbyteorder("=")
            if dtype not in dtypes:
                dtypes.append(dtype)
        regions, offset = [], 0
        for dtype in dtypes:
            members, size = [], 0
            for j, a in enumerate(arrays):
                if np.dtype(a.dtype).newbyteorder("=") == dtype:
                    members.append((j, size, int(a.size)))
                    size += int(a.size)
            regions.append(Region(dtype, offset, size, tuple(members)))
            offset += -(-size * dtype.itemsize // _ALIGN) * _ALIGN
        self.regions: tuple[Region, ...] = tuple(regions)
        self.row_bytes = max(offset, _ALIGN)
        self.capacity = capacity
        # np.zeros maps fresh zero pages lazily: rows that are never written cost no memory.
        self._data = np.zeros((capacity, self.row_bytes), dtype=np.uint8)
        self._shapes = [tuple(a.shape) for a in arrays]
        # Per array, a (capacity, *shape) view; row i of array j is then one indexing operation.
        self._arrays: list[np.ndarray] = [np.empty(0)] * len(arrays)
        for region in self.regions:
            for j, start, _ in region.members:
                self._arrays[j] = self._view(region.dtype, region.offset + start * region.dtype.itemsize,
                                             (capacity, *self._shapes[j]))  # fmt: skip

    def _view(self, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A view of ``self._data``: rows ``row_bytes`` apart, C order inside a row (never a copy)."""
        strides, step = [], dtype.itemsize
        for dim in reversed(shape[1:]):
            strides.append(step)
            step *= dim
        strides.append(self.row_bytes)
        return np.ndarray(shape, dtype, buffer=self._data, offset=offset, strides=tuple(reversed(strides)))

    @property
    def layout(self) -> tuple[tuple[Region, ...], tuple[tuple[int, ...], ...]]:
        """What two matrices must share for their rows to be aggregated together."""
        return self.regions, tuple(self._shapes)

    def row(self, index: int) -> Weights:
        """Writable arrays of row ``index``, in the template's shapes and dtypes."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"row {index} of an UpdateMatrix with {self.capacity} rows")
        return [a[index, ...] for a in self._arrays]

    def region_rows(self, region: Region, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``region`` as a (rows x region.size) view, for one BLAS call."""
        view = self._view(region.dtype, region.offset, (self.capacity, region.size))
        return view[start:stop]


class MatrixRows(Sequence[Weights]):
    """A selection of rows of :class:`UpdateMatrix` chunks of one layout, in order.

    What the kernels take for their BLAS path: consecutive rows of one matrix (:meth:`runs`) are
    one (rows x region) view each, with no copy; any subset (:meth:`select`) keeps that property
    for the rows that stay consecutive.
    """

    def __init__(self, rows: Sequence[tuple[UpdateMatrix, int]]) -> None:
        self._rows = list(rows)
        if not self._rows:
            raise ValueError("MatrixRows needs at least one row")
        layout = self._rows[0][0].layout
        if any(m.layout != layout for m, _ in self._rows[1:]):
            raise ValueError("MatrixRows must come from matrices of one layout")
        self.regions = self._rows[0][0].regions
        self._cache: dict[int, Weights] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Weights: ...

    @overload
    def __getitem__(self, index: slice) -> MatrixRows: ...

    def __getitem__(self, index: int | slice) -> Weights | MatrixRows:
        if isinstance(index, slice):
            return MatrixRows(self._rows[index])
        position = range(len(self._rows))[index]
        if position not in self._cache:
            matrix, row = self._rows[position]
            self._cache[position] = matrix.row(row)
        return self._cache[position]

    def select(self, positions: Sequence[int]) -> MatrixRows:
        """The rows at ``positions`` (in that order)."""
        return MatrixRows([self._rows[p] for p in positions])

    def runs(self, region: Region) -> list[tuple[int, int, np.ndarray]]:
        """``(start, stop, view)``: positions ``[start, stop)`` are consecutive rows of one matrix,
        ``view`` their (rows x ``region.size``) part of ``region`` (read-only)."""
        out: list[tuple[int, int, np.ndarray]] = []
        start = 0
        for k in range(1, len(self._rows) + 1):
            if k < len(self._rows):
                (m0, r0), (m, r) = self._rows[k - 1], self._rows[k]
                if m is m0 and r == r0 + 1:
                    continue
            matrix, first = self._rows[start]
            view = matrix.region_rows(region, first, first + k - start)
            view.flags.writeable = False
            out.append((start, k, view))
            start = k
        return out

    def shares_memory(self, arrays: Sequence[np.ndarray]) -> bool:
        """Whether any of ``arrays`` may lie in a matrix these rows come from (bounds check)."""
        matrices = {id(m): m for m, _ in self._rows}.values()
        return any(np.may_share_memory(a, m._data) for m in matrices for a in arrays)

    def region_row(self, position: int, region: Region) -> np.ndarray:
        """Row ``position``'s part of ``region`` as one writable 1-D view."""
        matrix, row = self._rows[position]
        view: np.ndarray = matrix.region_rows(region, row, row + 1)[0]
        return view


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
