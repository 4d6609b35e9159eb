"""Numeric kernels shared by the strategies and the validator: weighted sums, delta norms, Gram
matrices and coordinate-wise reductions over the updates of one round.

Why this module exists: a round holds N updates of P parameters (100 x 10M float32 is 4 GB),
so every pass over them is bound by memory bandwidth, and a copy of them is both slow and may not
fit. The kernels therefore

* never stack the updates into one array, but walk the parameters in blocks of :data:`BLOCK`
  elements: the accumulator and the scratch block stay in the CPU cache while each update is read
  from memory once;
* spread the blocks over a few threads (numpy releases the GIL inside its loops; no BLAS call runs
  inside those threads, so BLAS's own threads never oversubscribe the cores);
* use one BLAS matrix-vector product for clients whose arrays are rows of one matrix
  (:class:`~enclaveml.fl.strategies.UpdateMatrix`): BLAS reads several updates at once and
  reaches the memory bandwidth that one numpy stream does not. Given a
  :class:`~enclaveml.fl.strategies._update_matrix.MatrixRows` (what the aggregator passes), that is
  one call per dtype region per run of consecutive rows, with no per-array work at all.

The aggregator's ingest path lives here too: :func:`ingest` copies an upload into its row and
computes the squared norm of its delta in the same pass, block by block, while the block is in
cache; :func:`scale_deltas` is norm clipping in place on rows the aggregator owns.

Accumulators are float32 for float16/float32 arrays (as Flower and BLAS do) and float64 otherwise.
The built-in strategies replace what these kernels compute for integer and bool arrays by exact
medians (:mod:`._discrete`); a float64 mean of int64 values is neither exact nor bounded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from enclaveml.fl.strategies._update_matrix import MatrixRows, flat, matrix_runs, whole_row_sum
from enclaveml.fl.strategy import Weights

__all__ = [
    "BLOCK",
    "accumulator_dtype",
    "cast_like",
    "coordinate_reduce",
    "delta_gram",
    "delta_sq_norms",
    "ingest",
    "scale_deltas",
    "weighted_sum",
]

BLOCK = 1 << 17  # elements: 512 KiB of float32, so accumulator + scratch fit in a 1 MiB L2
_STACK_ELEMENTS = 1 << 21  # (clients x block) stacked for coordinate-wise reductions: 8 MiB of float32
_PARALLEL_MIN = 1 << 22  # element-reads below which threads cost more than they save
_MAX_THREADS = 4
_BLAS_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()

Job = Callable[[], None]


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float16/float32 arrays, float64 for everything else (float64, integers, bools)."""
    if dtype in (np.dtype(np.float16), np.dtype(np.float32)):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def cast_like(values: Sequence[np.ndarray], like: Weights) -> Weights:
    """``values`` as arrays in the dtypes and shapes of ``like``; integers are rounded, not truncated.

    A float value that an integer or bool array cannot hold (NaN, Inf, beyond the dtype's range)
    raises ValueError rather than being cast: numpy would wrap it (2**63 becomes -2**63 in int64)
    and a corrupt model would be handed to every participant. (The built-in strategies never get
    here with such values: their integer and bool arrays are medians computed in the array's own
    dtype, see :mod:`._discrete`.) Integer values are cast between integer dtypes exactly.

    (numpy turns 0-d results into scalars; ``np.asarray`` turns them back, since ``Weights`` holds
    arrays only.)
    """
    out: Weights = []
    for value, ref in zip(values, like, strict=True):
        value = np.asarray(value).reshape(ref.shape)
        if ref.dtype.kind in "iub" and value.dtype != ref.dtype:
            if value.dtype.kind in "fc":
                value = np.rint(value)
            _check_range(value, ref.dtype)
        out.append(np.asarray(value.astype(ref.dtype, copy=False)))
    return out


def _check_range(value: np.ndarray, dtype: np.dtype) -> None:
    """Refuse values outside ``[min, max]`` of an integer or bool ``dtype`` (and NaN)."""
    if value.size == 0 or np.can_cast(value.dtype, dtype, casting="safe"):
        return
    low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    if value.dtype.kind == "f":
        # high + 1 is a power of two, exact in a float; high itself may not be (2**63 - 1).
        with np.errstate(invalid="ignore"):
            inside = bool(np.all((value >= float(low)) & (value < float(high) + 1.0)))  # NaN: False
    elif value.dtype.kind in "iu":
        inside = low <= int(value.min()) and int(value.max()) <= high  # Python ints: exact
    else:  # complex and anything else: numpy's cast, as before
        return
    if not inside:
        raise ValueError(f"aggregated values do not fit the model's {dtype.name} array")


def weighted_sum(rows: Sequence[Weights], coeffs: Sequence[float] | np.ndarray, like: Weights) -> Weights:
    """``Σ_i coeffs[i] · rows[i][j]`` for every array ``j``, in :func:`accumulator_dtype` of ``like[j]``.

    ``rows`` are lists shaped like ``like`` (validated before); the result arrays are flat (and
    may be views into one buffer).
    """
    c64 = np.asarray(coeffs, dtype=np.float64)
    if len(rows) == 0 or c64.shape != (len(rows),):
        raise ValueError("weighted_sum needs one coefficient per row and at least one row")
    if isinstance(rows, MatrixRows):
        return _matrix_weighted_sum(rows, c64, like)
    whole = whole_row_sum(rows, c64, like)
    if whole is not None:
        return whole
    results: Weights = []
    jobs: list[tuple[int, Job]] = []
    for j, ref in enumerate(like):
        acc = accumulator_dtype(ref.dtype)
        c = c64.astype(acc)
        flats = [flat(r[j]) for r in rows]
        out = np.empty(ref.size, dtype=acc)
        written = False
        singles = list(range(len(rows)))
        for start, stop, matrix in matrix_runs(flats):
            # Outside the thread pool on purpose: BLAS runs its own threads.
            if written:
                out += np.matmul(c[start:stop], matrix)
            else:
                np.matmul(c[start:stop], matrix, out=out)
                written = True
            singles = [i for i in singles if not start <= i < stop]
        if singles:
            chosen, weights = [flats[i] for i in singles], c[singles]
            for a in range(0, ref.size, BLOCK):
                b = min(ref.size, a + BLOCK)
                job = _axpy_job(chosen, weights, out, a, b, accumulate=written)
                jobs.append(((b - a) * len(chosen), job))
        elif not written:  # pragma: no cover - rows is never empty
            out.fill(0)
        results.append(out)
    _run(jobs)
    return results


def _matrix_weighted_sum(rows: MatrixRows, c64: np.ndarray, like: Weights) -> Weights:
    """:func:`weighted_sum` over matrix rows: per dtype region, one BLAS call per run of rows
    (float32/float64), or the threaded block loop over the region's rows (float16, integers)."""
    results: Weights = [np.empty(0)] * len(like)
    jobs: list[tuple[int, Job]] = []
    for region in rows.regions:
        acc = accumulator_dtype(region.dtype)
        c = c64.astype(acc)
        out = np.empty(region.size, dtype=acc)
        if region.dtype in _BLAS_DTYPES:
            for k, (start, stop, matrix) in enumerate(rows.runs(region)):
                # Outside the thread pool on purpose: BLAS runs its own threads.
                if k:
                    out += np.matmul(c[start:stop], matrix)
                else:
                    np.matmul(c[start:stop], matrix, out=out)
        else:
            flats = [rows.region_row(i, region) for i in range(len(rows))]
            for a in range(0, region.size, BLOCK):
                b = min(region.size, a + BLOCK)
                jobs.append(((b - a) * len(flats), _axpy_job(flats, c, out, a, b, accumulate=False)))
        for j, start, size in region.members:
            results[j] = out[start : start + size]
    _run(jobs)
    return results


def ingest(source: Weights, row: Weights, global_weights: Weights) -> float:
    """Copy ``source`` into ``row`` and return the squared L2 norm of ``row - global_weights``.

    One pass: each block is copied, then subtracted from the global model while it is still in
    cache (the norm is defined as in :func:`delta_sq_norms`: float arrays only, non-finite on
    NaN/Inf). Arrays must already match in count, shape and dtype (validated before).
    """
    jobs: list[tuple[int, Job]] = []
    partials: list[float] = []

    def job(src: np.ndarray, dst: np.ndarray, g: np.ndarray | None, a: int, b: int, slot: int) -> Job:
        def run() -> None:
            np.copyto(dst[a:b], src[a:b])
            if g is None:
                return
            t = _scratch(accumulator_dtype(g.dtype), b - a)
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite norm is the answer
                np.subtract(dst[a:b], g[a:b], out=t, dtype=t.dtype)
                np.square(t, out=t)
                partials[slot] = float(t.sum())

        return run

    for src, dst, g in zip(source, row, global_weights, strict=True):
        if not dst.flags.c_contiguous:  # flat() would copy it, and the copy would be written
            raise ValueError("ingest needs C-contiguous destination arrays")
        s, d, gf = flat(src), flat(dst), flat(g)
        for a in range(0, d.size, BLOCK):
            b = min(d.size, a + BLOCK)
            partials.append(0.0)
            jobs.append((b - a, job(s, d, gf if g.dtype.kind == "f" else None, a, b, len(partials) - 1)))
    _run(jobs)
    return float(np.sum(partials, dtype=np.float64)) if partials else 0.0


def scale_deltas(global_weights: Weights, rows: Sequence[Weights], factors: np.ndarray) -> None:
    """In place, ``rows[i] ← g + factors[i] · (rows[i] - g)`` on the float arrays, where the factor is
    below 1 (norm clipping on rows the caller owns; same arithmetic as clipping into a new array)."""
    jobs: list[tuple[int, Job]] = []

    def job(x: np.ndarray, g: np.ndarray, factor: float, a: int, b: int) -> Job:
        def run() -> None:
            t = _scratch(accumulator_dtype(g.dtype), b - a)
            np.subtract(x[a:b], g[a:b], out=t, dtype=t.dtype)
            t *= factor
            t += g[a:b]
            np.copyto(x[a:b], t, casting="unsafe")

        return run

    for row, factor in zip(rows, factors, strict=True):
        if not factor < 1.0:
            continue
        for x, g in zip(row, global_weights, strict=True):
            if g.dtype.kind != "f":
                continue
            fx, fg = flat(x), flat(g)
            for a in range(0, fx.size, BLOCK):
                b = min(fx.size, a + BLOCK)
                jobs.append((b - a, job(fx, fg, float(factor), a, b)))
    _run(jobs)


def delta_sq_norms(global_weights: Weights, rows: Sequence[Weights]) -> np.ndarray:
    """Squared L2 norm of ``rows[i] - global_weights`` over the float arrays, per row (float64).

    Integer arrays (counters such as BatchNorm's ``num_batches_tracked``) are left out: they are
    not model directions, and a counter's change would dwarf the change of the weights.
    A NaN or Inf anywhere makes that row's result non-finite (and so can float32 overflow of a
    finite but absurd update: callers tell the two apart with ``np.isfinite`` when it matters).
    """
    norms = np.zeros(len(rows), dtype=np.float64)
    flat_global = [flat(g) for g in global_weights]

    def job(i: int) -> Job:
        def run() -> None:
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite norm is the answer
                norms[i] = squared_norm(rows[i])

        return run

    def squared_norm(row: Weights) -> float:
        total = 0.0
        for x, g in zip(row, flat_global, strict=True):
            if g.dtype.kind != "f":
                continue
            x = flat(x)
            scratch = _scratch(accumulator_dtype(g.dtype), min(BLOCK, g.size))
            for a in range(0, g.size, BLOCK):
                b = min(g.size, a + BLOCK)
                t = scratch[: b - a]
                np.subtract(x[a:b], g[a:b], out=t, dtype=t.dtype)
                np.square(t, out=t)
                total += float(t.sum())  # pairwise summation in numpy: no BLAS thread here
        return total

    size = sum(g.size for g in flat_global)
    _run([(size, job(i)) for i in range(len(rows))])
    return norms


def delta_gram(global_weights: Weights, rows: Sequence[Weights]) -> np.ndarray:
    """Gram matrix ``G[i, k] = <d_i, d_k>`` (float64) of the deltas ``d_i = rows[i] - global``
    over the float arrays (as :func:`delta_sq_norms`).

    Each block is centred on its coordinate-wise mean first: distances
    ``G[i, i] + G[k, k] - 2 G[i, k]`` do not change, and the cancellation in that formula stays
    small when all updates moved the same way. Runs in this thread, so BLAS may use its threads.
    """
    n = len(rows)
    gram = np.zeros((n, n), dtype=np.float64)
    block = max(256, _STACK_ELEMENTS // n)
    for j, g in enumerate(global_weights):
        if g.dtype.kind != "f":
            continue
        flat_g = flat(g)
        flats = [flat(r[j]) for r in rows]
        stack = np.empty((n, min(block, g.size)), dtype=accumulator_dtype(g.dtype))
        for a in range(0, g.size, block):
            b = min(g.size, a + block)
            buf = stack[:, : b - a]
            for i, x in enumerate(flats):
                np.subtract(x[a:b], flat_g[a:b], out=buf[i], dtype=buf.dtype)
            buf -= buf.mean(axis=0)
            gram += np.matmul(buf, buf.T)
    return gram


def coordinate_reduce(
    rows: Sequence[Weights], like: Weights, reducer: Callable[[np.ndarray, np.ndarray], None]
) -> Weights:
    """Per coordinate, ``reducer(stacked, out)`` over the rows: ``stacked`` is (rows x block).

    ``stacked`` is scratch space the reducer may reorder (``np.partition`` in place);
    ``out`` is the matching block of the flat result, in :func:`accumulator_dtype`.
    """
    n = len(rows)
    block = max(256, _STACK_ELEMENTS // n)
    results: Weights = []
    jobs: list[tuple[int, Job]] = []
    for j, ref in enumerate(like):
        acc = accumulator_dtype(ref.dtype)
        out = np.empty(ref.size, dtype=acc)
        flats = [flat(r[j]) for r in rows]
        for a in range(0, ref.size, block):
            b = min(ref.size, a + block)
            jobs.append(((b - a) * n, _stack_job(flats, out, a, b, block, reducer)))
        results.append(out)
    _run(jobs)
    return results


# --- internals ---------------------------------------------------------------------------------


def _scratch(dtype: np.dtype, size: int, rows: int = 0) -> np.ndarray:
    """This thread's reusable buffer: fresh large allocations cost a page fault per 4 KiB."""
    cache: dict[tuple[np.dtype, int], np.ndarray] | None = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (dtype, rows)
    needed = size * max(rows, 1)
    buf = cache.get(key)
    if buf is None or buf.size < needed:
        buf = cache[key] = np.empty(needed if rows else max(needed, BLOCK), dtype=dtype)
    flat = buf[:needed]
    return flat.reshape(rows, size) if rows else flat


def _axpy_job(
    rows: list[np.ndarray], coeffs: np.ndarray, out: np.ndarray, a: int, b: int, *, accumulate: bool
) -> Job:
    def run() -> None:
        o = out[a:b]
        t = _scratch(out.dtype, b - a)
        first = 0
        if not accumulate:
            np.multiply(rows[0][a:b], coeffs[0], out=o, dtype=o.dtype)
            first = 1
        for x, c in zip(rows[first:], coeffs[first:], strict=True):
            if c == 1:
                np.add(o, x[a:b], out=o, dtype=o.dtype)
            else:
                np.multiply(x[a:b], c, out=t, dtype=t.dtype)
                np.add(o, t, out=o)

    return run


def _stack_job(
    rows: list[np.ndarray],
    out: np.ndarray,
    a: int,
    b: int,
    block: int,
    reducer: Callable[[np.ndarray, np.ndarray], None],
) -> Job:
    def run() -> None:
        stacked = _scratch(out.dtype, block, rows=len(rows))[:, : b - a]
        for i, x in enumerate(rows):
            stacked[i] = x[a:b]
        reducer(stacked, out[a:b])

    return run


def _threads() -> int:
    """Threads for the block loops: ``ENCLAVEML_FL_THREADS`` if set, else the usable cores (at most 4).

    The override exists for enclaves, whose affinity mask may not match the cores they really
    get, and for benchmarks that compare single-threaded kernels.
    """
    configured = os.environ.get("ENCLAVEML_FL_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, cores))


def _run(jobs: list[tuple[int, Job]]) -> None:
    """Run the jobs, split into contiguous groups of similar cost, one group per thread."""
    threads = _threads()
    total = sum(cost for cost, _ in jobs)
    if threads == 1 or total < _PARALLEL_MIN or len(jobs) < 2:
        for _, job in jobs:
            job()
        return
    groups: list[list[Job]] = [[] for _ in range(threads)]
    done = 0
    for cost, job in jobs:
        groups[min(threads - 1, done * threads // total)].append(job)
        done += cost
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="enclaveml-fl")
            _pool_size = threads
        pool = _pool
    for _ in pool.map(_run_group, [g for g in groups if g]):
        pass


def _run_group(group: list[Job]) -> None:
    for job in group:
        job()
