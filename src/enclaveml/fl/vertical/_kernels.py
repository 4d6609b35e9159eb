"""Compiled loops for boosting's hot paths (numba, when installed) and the codes they run over.

numpy has no scatter-add that does not hold the GIL and make one pass per feature, and no
loop for xgboost's split enumeration, so with numba installed (the ``fast`` extra) three loops
are compiled: histogram building (row by row, all features of a row at once), the split scan
(xgboost's ``EnumerateSplit`` as written) and the row partition. Without numba, or with
``ENCLAVEML_VFL_KERNELS=numpy``, the numpy code in :mod:`._histogram` runs instead. The compiled
loops release the GIL; histograms (split by feature) and the split scan (split by node) run on
``ENCLAVEML_VFL_THREADS`` threads, every core by default. No thread waits spinning, so a busy
machine slows them down gracefully (unlike OpenMP's barriers).

Both give bit-identical results, by construction: every histogram cell adds the same rows in
the same order in float64, and the split scan evaluates the same float32 expressions as the numpy
search and picks by the same rule (the tests run both). So which one ran never changes a tree.
Compiled code is cached next to this file (``cache=True``); where that directory is read-only,
numba compiles at first use in each process (a second or two).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = ["Codes", "compiled"]

# numba is imported at the first compiled call, not with this module: it takes a quarter of a
# second to import, and a party running PSI or logistic regression never needs it.
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def available() -> bool:
    """Whether numba is installed."""
    return _HAVE_NUMBA


def compiled() -> bool:
    """Whether the numba kernels run (numba installed and not switched off)."""
    return _HAVE_NUMBA and os.environ.get("ENCLAVEML_VFL_KERNELS", "numba") != "numpy"


class Codes:
    """Bin codes of a set of rows: ``rows x features`` C-order (what the compiled kernels read),
    and on demand the ``features x rows`` copy that the numpy code reads column by column."""

    def __init__(self, by_row: np.ndarray) -> None:
        self.by_row = np.ascontiguousarray(by_row)
        self._selected: tuple[bytes, np.ndarray] = (b"", self.by_row)

    def selected(self, features: np.ndarray) -> np.ndarray:
        """``by_row[:, features]`` (C-order), kept for the next call with the same features: the
        compiled histogram loop reads a row's codes straight, without a column index."""
        if len(features) == self.n_features and (features == np.arange(self.n_features)).all():
            return self.by_row
        key = np.asarray(features, dtype=np.int64).tobytes()
        if self._selected[0] != key:
            self._selected = (key, np.ascontiguousarray(self.by_row[:, features]))
        return self._selected[1]

    @cached_property
    def by_feature(self) -> np.ndarray:
        return np.ascontiguousarray(self.by_row.T)

    @property
    def n_rows(self) -> int:
        return int(self.by_row.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.by_row.shape[1])

    def column(self, feature: int) -> np.ndarray:
        return self.by_feature[feature] if not compiled() else self.by_row[:, feature]


def _int64(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int64)


def _histograms_loop(
    codes: Any, gh: Any, rows: Any, starts: Any, stride: Any, out: Any, first: Any, stop: Any
) -> Any:
    # Features first..stop-1 only: threads split the features, each cell has one writer.
    n_features = codes.shape[1]
    for k in range(starts.shape[0] - 1):
        base = k * n_features * stride
        for i in range(starts[k], starts[k + 1]):
            r = rows[i]
            g = gh[r]
            row = codes[r]
            for j in range(first, stop):
                out[base + j * stride + row[j]] += g


def _gain32(stats: Any, reg_lambda: Any) -> Any:
    if stats.imag <= 0:
        return np.float32(0)
    return np.float32(stats.real * stats.real / (stats.imag + reg_lambda))


def _better(best_loss: Any, best_feature: Any, loss: Any, feature: Any) -> Any:
    # xgboost's SplitEntry::NeedReplace: ties go to the lower feature index.
    if np.isinf(loss):
        return False
    if best_feature <= feature:
        return loss > best_loss
    return not best_loss > loss


def _scan_loop(
    hist: Any, parent: Any, n_bins: Any, allowed: Any, reg_lambda: Any, mcw: Any,
    loss: Any, feature: Any, bins: Any, left: Any, right: Any, found: Any, first: Any, stop: Any,
) -> Any:  # fmt: skip
    # Nodes first..stop-1 only: threads split the nodes.
    n_features, stride = hist.shape[1], hist.shape[2]
    n_real = stride - 1
    for k in range(first, stop):
        total = parent[k]
        root = _gain32(total, reg_lambda)
        best_loss, best_feature, best_bin, best_left, best_right = np.float32(0), 0, 0, 0j, 0j
        for f in range(n_features):
            if not allowed[k, f]:
                continue
            local_loss, local_bin, local_left, local_right, local_found = np.float32(0), 0, 0j, 0j, False
            acc = 0j
            for i in range(n_bins[f]):
                if hist[k, f, i] == 0:  # an empty bin repeats the previous candidate: no gain
                    continue
                acc += hist[k, f, i]
                other = total - acc
                if acc.imag >= mcw and other.imag >= mcw:
                    change = (_gain32(acc, reg_lambda) + _gain32(other, reg_lambda)) - root
                    if _better(local_loss, 0, change, 0):
                        local_loss, local_bin, local_left, local_right = change, i, acc, other
                        local_found = True
            missing = hist[k, f, n_real]
            if missing.real != 0 or missing.imag != 0:
                acc = 0j
                for i in range(n_bins[f] - 1, -1, -1):
                    if hist[k, f, i] == 0:
                        continue
                    acc += hist[k, f, i]
                    other = total - acc
                    if acc.imag >= mcw and other.imag >= mcw:
                        change = (_gain32(other, reg_lambda) + _gain32(acc, reg_lambda)) - root
                        if _better(local_loss, 0, change, 0):
                            # a backward candidate's position is n_real + its first right bin
                            local_loss, local_bin, local_left, local_right = change, n_real + i, other, acc
                            local_found = True
            if local_found and _better(best_loss, best_feature, local_loss, f):
                best_loss, best_feature, best_bin = local_loss, f, local_bin
                best_left, best_right = local_left, local_right
                found[k] = True
        loss[k], feature[k], bins[k], left[k], right[k] = (
            best_loss,
            best_feature,
            best_bin,
            best_left,
            best_right,
        )


def _left_loop(codes_t: Any, rows: Any, starts: Any, splits: Any, missing: Any, out: Any) -> Any:
    for k in range(starts.shape[0] - 1):
        column = codes_t[splits[k, 0]]
        bin_index, default_left = splits[k, 1], splits[k, 2] != 0
        for i in range(starts[k], starts[k + 1]):
            code = column[rows[i]]
            # the missing code is above every bin, so only default_left can send it left
            out[i] = (code <= bin_index) | (default_left & (code == missing))


def _split_loop(rows: Any, starts: Any, mask: Any, out: Any, n_left: Any, scratch: Any) -> Any:
    # Branch-free: every row is written to both sides, the cursors advance by the mask.
    for k in range(starts.shape[0] - 1):
        left, right = starts[k], 0
        for i in range(starts[k], starts[k + 1]):
            r, m = rows[i], mask[i]
            out[left] = r
            scratch[right] = r
            left += m
            right += 1 - m
        out[left : starts[k + 1]] = scratch[:right]
        n_left[k] = left - starts[k]


def _partition_loop(
    codes_t: Any, rows: Any, starts: Any, splits: Any, missing: Any, out: Any, n_left: Any, scratch: Any
) -> Any:
    # _left_loop and _split_loop in one pass, for codes in this process.
    for k in range(starts.shape[0] - 1):
        column = codes_t[splits[k, 0]]
        bin_index, default_left = splits[k, 1], splits[k, 2] != 0
        left, right = starts[k], 0
        for i in range(starts[k], starts[k + 1]):
            r = rows[i]
            code = column[r]
            m = (code <= bin_index) | (default_left & (code == missing))
            out[left] = r
            scratch[right] = r
            left += m
            right += 1 - m
        out[left : starts[k + 1]] = scratch[:right]
        n_left[k] = left - starts[k]


_COMPILE = threading.Lock()
_compiled: SimpleNamespace | None = None


def _loops() -> SimpleNamespace:
    """The compiled loops, compiled once (parties may call from several threads at once). numba
    resolves the helpers the scan calls as module globals, so those become compiled first."""
    global _compiled
    if _compiled is None:
        with _COMPILE:
            if _compiled is None:
                numba = importlib.import_module("numba")
                jit = numba.njit(cache=True, nogil=True, boundscheck=False)
                globals()["_gain32"] = jit(_gain32)
                globals()["_better"] = jit(_better)
                _compiled = SimpleNamespace(
                    histograms=jit(_histograms_loop),
                    scan=jit(_scan_loop),
                    left=jit(_left_loop),
                    split=jit(_split_loop),
                    partition=jit(_partition_loop),
                )
    return _compiled


def threads() -> int:
    """Threads for the compiled loops: ``ENCLAVEML_VFL_THREADS``, else every core."""
    value = os.environ.get("ENCLAVEML_VFL_THREADS", "")
    return max(1, int(value)) if value.isdigit() else max(1, os.cpu_count() or 1)


_POOL_LOCK = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _helpers(n: int) -> ThreadPoolExecutor:
    """``n`` helper threads kept for the process (starting threads per call costs more than a level)."""
    global _pool
    with _POOL_LOCK:
        if _pool is None or _pool[0] < n:
            _pool = (n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="vfl-kernel"))
        return _pool[1]


def _in_threads(loop: Any, n_items: int, work: int, *args: Any) -> None:
    """Run ``loop(*args, first, stop)`` over ``range(n_items)`` split between threads; the loops
    release the GIL and write disjoint parts of their outputs. Small jobs stay on this thread."""
    n_threads = min(threads(), n_items)
    if n_threads <= 1 or work < 1 << 18:
        loop(*args, 0, n_items)
        return
    bounds = np.linspace(0, n_items, n_threads + 1).astype(np.int64).tolist()
    pool = _helpers(n_threads - 1)
    helpers = [pool.submit(functools.partial(loop, *args, a, b)) for a, b in itertools.pairwise(bounds[1:])]
    loop(*args, bounds[0], bounds[1])
    for helper in helpers:
        helper.result()


def histograms(
    codes: Codes, features: np.ndarray, gh: np.ndarray, rows: np.ndarray, counts: np.ndarray, stride: int
) -> np.ndarray:
    """Compiled :func:`._histogram.build_histograms` (flat ``nodes * features * stride``).

    With more than one thread the features are split between threads; a cell is still summed by
    one thread over the same rows in the same order.
    """
    out = np.zeros(len(counts) * len(features) * stride, dtype=np.complex128)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    table, rows = codes.selected(features), _int64(rows)
    _in_threads(
        _loops().histograms, len(features), len(rows) * len(features), table, gh, rows, starts, stride, out
    )
    return out


def scan(
    hist: np.ndarray,
    parent: np.ndarray,
    n_bins: np.ndarray,
    allowed: np.ndarray,
    reg_lambda: float,
    mcw: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compiled split search: per node loss, feature, position (a backward candidate at ``n_real +``
    its first right bin), left and right stats, and whether any candidate was found."""
    n_nodes = hist.shape[0]
    loss = np.zeros(n_nodes, dtype=np.float32)
    feature = np.zeros(n_nodes, dtype=np.int64)
    position = np.zeros(n_nodes, dtype=np.int64)
    left = np.zeros(n_nodes, dtype=np.complex128)
    right = np.zeros(n_nodes, dtype=np.complex128)
    found = np.zeros(n_nodes, dtype=np.bool_)
    _in_threads(
        _loops().scan, n_nodes, hist.size, np.ascontiguousarray(hist), parent, n_bins.astype(np.int64),
        allowed, float(reg_lambda), float(mcw), loss, feature, position, left, right, found,
    )  # fmt: skip
    return loss, feature, position, left, right, found


def left_masks(
    codes: Codes, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, missing: int
) -> np.ndarray:
    """Compiled ``partition_rows``: one pass over the rows of every node."""
    out = np.empty(len(rows), dtype=np.bool_)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    _loops().left(codes.by_feature, _int64(rows), starts, _int64(splits), missing, out)
    return out


def split_nodes(rows: np.ndarray, counts: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each node's rows with the left ones first (stable), and the number of left rows per node."""
    out = np.empty(len(rows), dtype=np.int64)
    n_left = np.empty(len(counts), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    _loops().split(
        _int64(rows), starts, mask.view(np.uint8), out, n_left, np.empty(len(rows), dtype=np.int64)
    )
    return out, n_left


def partition_split(
    codes: Codes, rows: np.ndarray, counts: np.ndarray, splits: np.ndarray, missing: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`left_masks` then :func:`split_nodes` in one pass (codes held here)."""
    out = np.empty(len(rows), dtype=np.int64)
    n_left = np.empty(len(counts), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    scratch = np.empty(len(rows), dtype=np.int64)
    _loops().partition(codes.by_feature, _int64(rows), starts, _int64(splits), missing, out, n_left, scratch)
    return out, n_left
