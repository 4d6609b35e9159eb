"""The FL aggregation benchmark's data, generated identically in our venv and in Flower's.

Only numpy is imported here: ``benchmarks/_flower_worker.py`` runs this module under the
separate Flower venv, whose numpy is pinned to ours, so the same seed gives the same bytes
(both sides also report a checksum of their aggregate to prove it).

A model of ``P`` float32 parameters is 8 arrays: four weight matrices holding 55 %, 30 %, 10 %
and the rest of the parameters, and four 1,000-element biases, like a small CNN/MLP. Client
``i`` sends ``global + 0.01 · N(0, 1)`` and claims ``num_examples`` between 1 and 100.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BIAS = 1000


def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """Shapes of the 8 arrays of a ``params``-parameter model (sizes sum to ``params``)."""
    big = params - 4 * BIAS
    sizes = [int(big * 0.55), int(big * 0.30), int(big * 0.10)]
    sizes.append(big - sum(sizes))
    shapes: list[tuple[int, ...]] = [(s // 1000, 1000) if s % 1000 == 0 else (s,) for s in sizes]
    return shapes + [(BIAS,)] * 4


def global_weights(params: int, seed: int) -> list[np.ndarray]:
    """The global model the clients started from."""
    rng = np.random.default_rng([seed, 0])
    return [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(params)]


def num_examples(clients: int, seed: int) -> list[int]:
    """Each client's claimed example count."""
    return [int(n) for n in np.random.default_rng([seed, 1]).integers(1, 101, size=clients)]


def fill_client(row: np.ndarray, client: int, params: int, seed: int) -> None:
    """Write client ``client``'s flat parameters (``params`` float32) into ``row``."""
    rng = np.random.default_rng([seed, 2, client])
    offset = 0
    for g in global_weights_cached(params, seed):
        flat = g.reshape(-1)
        part = row[offset : offset + flat.size]
        rng.standard_normal(flat.size, dtype=np.float32, out=part)
        part *= np.float32(0.01)
        part += flat
        offset += flat.size


_cache: dict[tuple[int, int], list[np.ndarray]] = {}


def global_weights_cached(params: int, seed: int) -> list[np.ndarray]:
    key = (params, seed)
    if key not in _cache:
        _cache.clear()
        _cache[key] = global_weights(params, seed)
    return _cache[key]


def split(row: np.ndarray, params: int) -> list[np.ndarray]:
    """Views of a flat row as the model's arrays."""
    out, offset = [], 0
    for shape in layer_shapes(params):
        size = int(np.prod(shape))
        out.append(row[offset : offset + size].reshape(shape))
        offset += size
    return out


def client_weights(clients: int, params: int, seed: int) -> Iterator[list[np.ndarray]]:
    """Each client's arrays, as separate allocations (what decoding uploads produces)."""
    for i in range(clients):
        row = np.empty(params, dtype=np.float32)
        fill_client(row, i, params, seed)
        yield [a.copy() for a in split(row, params)]


def checksum(weights: list[np.ndarray]) -> dict[str, float]:
    """Float64 sum and first values of an aggregate, to compare results across processes."""
    flat = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in weights])
    return {"sum": float(flat.sum()), "abs_sum": float(np.abs(flat).sum()), "first": float(flat[0])}
