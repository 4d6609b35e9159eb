"""Flower's side of the FL aggregation benchmark; runs under ``benchmarks/.venv-flwr`` only.

(The ``type: ignore`` comments are for mypy run from our venv, where flwr is deliberately absent.)

Invoked by ``benchmarks/fl_aggregation.py`` as ``<flwr venv python> benchmarks/_flower_worker.py
'<json task>'``; prints one JSON object. It imports numpy, flwr and ``benchmarks._fl_data``
(numpy only), never enclaveml: Flower's pins conflict with our dependencies.

Tasks:

* ``aggregate``: ``flwr.server.strategy.aggregate.aggregate`` (the FedAvg weighted average of
  ``list[(NDArrays, num_examples)]``) on the benchmark's data, ``repeats`` times; the last result
  is saved to ``out`` (``.npy``, flat float32) for the caller to compare with ours.
* ``secagg``: the server's unmasking in SecAgg+ (``SecAggPlusWorkflow.unmask_stage`` of
  ``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``), replayed with Flower's
  own functions on ``N`` clients that are all each other's neighbours (``num_shares = N``) and
  none of which dropped out. Untimed setup does what the clients do in
  ``flwr/client/mod/secure_aggregation/secaggplus_mod.py``: weight, quantize, add the private
  mask ``PRG(b_i)``, split the seed ``b_i`` into ``N`` Shamir shares. Pairwise masks are left
  out: they cancel exactly (mod 2^32) in the sum the server holds, so the server's input and its
  unmasking work are those of the real protocol, and generating N² masks would take hours.
  Timed separately: ``collect_sum_s`` (stage 2: summing the masked vectors, the counterpart of a
  plain aggregation) and ``unmask_s`` (stage 3: for every client, Shamir-combine its N seed
  shares, regenerate its private mask, subtract it; then mod, dequantize, rescale).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _fl_data as data


def aggregate_task(task: dict[str, Any]) -> dict[str, Any]:
    from flwr.server.strategy.aggregate import aggregate  # type: ignore[import-not-found]

    n, p, seed = task["clients"], task["params"], task["seed"]
    counts = data.num_examples(n, seed)
    results = list(zip(data.client_weights(n, p, seed), counts, strict=True))
    times, out = [], None
    for _ in range(task["repeats"]):
        out = None
        started = time.perf_counter()
        out = aggregate(results)
        times.append(time.perf_counter() - started)
    assert out is not None
    np.save(task["out"], np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in out]))
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def secagg_task(task: dict[str, Any]) -> dict[str, Any]:
    from flwr.common.secure_aggregation.crypto.shamir import (  # type: ignore[import-not-found]
        combine_shares,
        create_shares,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (  # type: ignore[import-not-found]
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import (  # type: ignore[import-not-found]
        dequantize,
        quantize,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import (  # type: ignore[import-not-found]
        pseudo_rand_gen,
    )

    n, p, seed = task["clients"], task["params"], task["seed"]
    # SecAggPlusWorkflow defaults; num_shares = N: everyone is everyone's neighbour.
    clipping_range, quantization_range, mod_range, max_weight = 8.0, 2**22, 2**32, 1000.0
    threshold = n // 2 + 1
    np.random.seed(seed)  # quantize() rounds stochastically with numpy's global generator
    rng = np.random.default_rng([seed, 99])
    counts = data.num_examples(n, seed)

    setup_started = time.perf_counter()
    masked: list[list[np.ndarray]] = []
    shares_by_owner: list[list[bytes]] = []
    for weights, num_examples in zip(data.client_weights(n, p, seed), counts, strict=True):
        q_ratio = round(num_examples / max_weight * quantization_range)
        params = parameters_multiply(weights, q_ratio / quantization_range)
        quantized = factor_combine(q_ratio, quantize(params, clipping_range, quantization_range))
        rd_seed = rng.bytes(32)
        private_mask = pseudo_rand_gen(rd_seed, mod_range, get_parameters_shape(quantized))
        masked.append(parameters_mod(parameters_addition(quantized, private_mask), mod_range))
        shares_by_owner.append(create_shares(rd_seed, threshold, n))
    setup_s = time.perf_counter() - setup_started

    # Stage 2 (collect masked vectors): the server sums what it received.
    started = time.perf_counter()
    masked_vector = reduce(parameters_addition, masked)
    masked_vector = parameters_mod(masked_vector, mod_range)
    collect_sum_s = time.perf_counter() - started
    del masked

    # Stage 3 (unmask): exactly the arithmetic of unmask_stage for active clients.
    started = time.perf_counter()
    for share_list in shares_by_owner:
        secret = combine_shares(share_list)
        private_mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked_vector))
        masked_vector = parameters_subtraction(masked_vector, private_mask)
    recon = parameters_mod(masked_vector, mod_range)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = quantization_range / q_total_ratio
    aggregated = dequantize(recon, clipping_range, quantization_range)
    offset = -(n - 1) * clipping_range
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    unmask_s = time.perf_counter() - started

    # The unmasked result must be the example-weighted mean (up to quantization).
    total = sum(counts)
    expected = [np.zeros(a.shape, np.float64) for a in aggregated]
    for weights, c in zip(data.client_weights(n, p, seed), counts, strict=True):
        for e, w in zip(expected, weights, strict=True):
            e += (c / total) * w
    error = max(float(np.max(np.abs(a - e))) for a, e in zip(aggregated, expected, strict=True))
    return {
        "setup_s": setup_s,
        "collect_sum_s": collect_sum_s,
        "unmask_s": unmask_s,
        "threshold": threshold,
        "num_shares": n,
        "max_abs_error_vs_weighted_mean": error,
    }


def main() -> int:
    task = json.loads(sys.argv[1])
    import flwr  # type: ignore[import-not-found]

    result = aggregate_task(task) if task["task"] == "aggregate" else secagg_task(task)
    result.update({"flwr": flwr.__version__, "numpy": np.__version__})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
