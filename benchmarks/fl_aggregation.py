"""FL aggregation time: our FedAvg against numpy, Flower's ``aggregate`` and Flower's SecAgg+ unmasking.

For N = 10, 50, 100 clients x P = 1M and 10M float32 parameters (8 arrays per model, see
``benchmarks/_fl_data.py``), interleaved, medians of ``--repeats``:

* ``ours``: ``FedAvg().aggregate_train`` on updates decoded into separate arrays (what the
  aggregator has today);
* ``ours_update_matrix``: the same call on updates stored as rows of one matrix
  (``enclaveml.fl.strategies.UpdateMatrix``), aggregated with one BLAS call per array;
* ``numpy_stacked``: ``weights @ stacked`` on a ready (N x P) float32 matrix: BLAS, no copy, the
  plain numpy weighted average of ``/work/shared/BASELINES.md`` and the goal's reference
  (ours / numpy_stacked <= 1.5);
* ``numpy_list``: what plain numpy code does with a list of updates: ``np.stack`` each array
  across clients, then ``np.tensordot``;
* ``flower_aggregate``: ``flwr.server.strategy.aggregate.aggregate`` on identical data, in a
  subprocess under ``benchmarks/.venv-flwr`` (see ``benchmarks/_flower_env.py``; Flower's pins
  conflict with ours, so it never enters ``.venv``).

Then Flower's SecAgg+ server unmasking for the same N at P = 1M (each once; N = 100 takes a few
minutes), as described in ``benchmarks/_flower_worker.py``, against ``ours`` (goal >= 1000x),
and the other strategies and ``validate_updates`` at P = 1M for scale. The ours-vs-numpy cases
run a second time in a child process with one thread everywhere (``OPENBLAS_NUM_THREADS=1``,
``ENCLAVEML_FL_THREADS=1``): on a shared machine that is the steadier comparison of the kernels.

Run: ``.venv/bin/python -m benchmarks.fl_aggregation`` (about 10 minutes; about 10 GB of memory at
100 x 10M; ``--quick`` for a smaller run). Results in ``benchmarks/results/fl_aggregation.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _fl_data as data
from benchmarks import _flower_env
from benchmarks._common import write_results
from enclaveml.fl.strategies import (
    CentralDP,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    Krum,
    NormClipping,
    TrimmedMean,
)
from enclaveml.fl.strategies._kernels import _threads
from enclaveml.fl.strategy import ClientUpdate, Strategy
from enclaveml.fl.validation import validate_updates

SEED = 20261121
M = 1_000_000
WORKER = Path(__file__).resolve().parent / "_flower_worker.py"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each function once per round, ``repeats`` rounds, after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            gc.collect()
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started
            if round_:
                times[name].append(elapsed)
    return times


def flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(w, dtype=np.float32).reshape(-1) for w in weights])


def ours_case(n: int, p: int, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    g = data.global_weights(p, SEED)
    counts = data.num_examples(n, SEED)
    coeffs = (np.array(counts, np.float64) / sum(counts)).astype(np.float32)
    stacked = np.empty((n, p), dtype=np.float32)
    for i in range(n):
        data.fill_client(stacked[i], i, p, SEED)
    in_matrix = [ClientUpdate(str(i), data.split(stacked[i], p), c) for i, c in enumerate(counts)]
    separate = [
        ClientUpdate(str(i), w, c)
        for i, (w, c) in enumerate(zip(data.client_weights(n, p, SEED), counts, strict=True))
    ]
    fedavg = FedAvg()

    def numpy_list() -> list[np.ndarray]:
        return [
            np.tensordot(coeffs, np.stack([u.weights[j] for u in separate]), axes=1) for j in range(len(g))
        ]

    fns: dict[str, Callable[[], object]] = {
        "numpy_stacked": lambda: coeffs @ stacked,
        "ours": lambda: fedavg.aggregate_train(1, g, separate),
        "ours_update_matrix": lambda: fedavg.aggregate_train(1, g, in_matrix),
        "numpy_list": numpy_list,
    }
    times = interleaved(fns, repeats)
    medians = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    ours = flat(fedavg.aggregate_train(1, g, separate))
    reference = np.zeros(p, dtype=np.float64)  # row by row: float64 @ stacked would copy it all to float64
    for c, row in zip(np.array(counts, np.float64) / sum(counts), stacked, strict=True):
        reference += c * row
    started = time.perf_counter()
    validation = validate_updates(g, separate)
    validate_s = time.perf_counter() - started
    assert not validation.rejected
    result = {
        "clients": n,
        "params": p,
        "median_s": medians,
        "min_s": mins,
        "ratio_ours_to_numpy_stacked": medians["ours"] / medians["numpy_stacked"],
        # Minimums are less disturbed by other work on a shared machine; both are reported.
        "ratio_ours_to_numpy_stacked_of_minimums": mins["ours"] / mins["numpy_stacked"],
        "ratio_update_matrix_to_numpy_stacked_of_minimums": mins["ours_update_matrix"]
        / mins["numpy_stacked"],
        "ratio_update_matrix_to_numpy_stacked": medians["ours_update_matrix"] / medians["numpy_stacked"],
        "ratio_ours_to_numpy_list": medians["ours"] / medians["numpy_list"],
        "max_abs_diff_ours_vs_float64": float(np.max(np.abs(ours - reference))),
        "validate_updates_s": validate_s,
    }
    return result, ours


def flower(task: dict[str, Any]) -> dict[str, Any]:
    command = [str(_flower_env.python()), str(WORKER), json.dumps(task)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=WORKER.parent.parent)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def flower_case(n: int, p: int, repeats: int, ours: np.ndarray) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flower.npy"
        result = flower(
            {
                "task": "aggregate",
                "clients": n,
                "params": p,
                "seed": SEED,
                "repeats": repeats,
                "out": str(path),
            }
        )
        theirs = np.load(path)
    result["max_abs_diff_vs_ours"] = float(np.max(np.abs(theirs - ours)))
    return result


def strategies_case(n: int, p: int, repeats: int) -> dict[str, float]:
    g = data.global_weights(p, SEED)
    counts = data.num_examples(n, SEED)
    updates = [
        ClientUpdate(str(i), w, c)
        for i, (w, c) in enumerate(zip(data.client_weights(n, p, SEED), counts, strict=True))
    ]
    strategies: list[Strategy] = [
        FedAvg(), FedAdam(), CoordinateMedian(), TrimmedMean(0.1),
        Krum(max(1, n // 10), multi=max(1, n // 2)), NormClipping(FedAvg(), max_norm=1.0),
        CentralDP(FedAvg(), 1.0, 1.0, 1e-5),
    ]  # fmt: skip

    def run(strategy: Strategy) -> Callable[[], object]:
        return lambda: strategy.aggregate_train(1, g, updates)

    fns = {s.name: run(s) for s in strategies}
    fns["validate_updates"] = lambda: validate_updates(g, updates)
    return {k: statistics.median(v) for k, v in interleaved(fns, repeats).items()}


def single_thread_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``ours`` vs numpy cases again with one thread everywhere (our blocks and BLAS).

    On a shared machine, multi-threaded timings depend on what else runs (a descheduled BLAS
    thread stalls the whole call); one core each is the steadier comparison of the kernels.
    """
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "ENCLAVEML_FL_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.fl_aggregation", "--single-thread-child"]
    command += ["--clients", *map(str, args.clients), "--params-m", *map(str, args.params_m)]
    command += ["--repeats", str(args.repeats)]
    out = subprocess.run(
        command, check=True, capture_output=True, text=True, env=env, cwd=WORKER.parent.parent
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _repeats(repeats: int, params: int) -> int:
    return repeats if params <= M else max(3, repeats - 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--params-m", type=int, nargs="+", default=[1, 10], help="millions of parameters")
    parser.add_argument("--secagg-clients", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions at 1M (10M: 2 fewer)")
    parser.add_argument("--no-flower", action="store_true", help="skip everything that needs the Flower venv")
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 at P = 1M; SecAgg+ at N = 10")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the one-core comparison")
    parser.add_argument("--single-thread-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.params_m, args.secagg_clients = [10, 100], [1], [10]
    if args.single_thread_child:  # our part only, printed as JSON for the parent
        sizes = [(n, m * M) for m in args.params_m for n in args.clients]
        print(json.dumps([ours_case(n, p, _repeats(args.repeats, p))[0] for n, p in sizes]))
        return 0

    load_before = os.getloadavg()
    env = None if args.no_flower else _flower_env.ensure()
    cases, ours_by_case = [], {}
    for p in (m * M for m in args.params_m):
        for n in args.clients:
            result, ours = ours_case(n, p, _repeats(args.repeats, p))
            gc.collect()
            if env is not None:
                result["flower_aggregate"] = flower_case(n, p, args.repeats if p <= M else 3, ours)
                result["ratio_flower_to_ours"] = (
                    result["flower_aggregate"]["median_s"] / result["median_s"]["ours"]
                )
            ours_by_case[(n, p)] = result["median_s"]["ours"]
            cases.append(result)
            _print_case(result)

    single = [] if args.no_single_thread else single_thread_cases(args)
    for r in single:
        print("one core:", end=" ")
        _print_case(r)

    secagg = []
    for n in [] if env is None else args.secagg_clients:
        if (n, M) not in ours_by_case:
            ours_by_case[(n, M)] = ours_case(n, M, args.repeats)[0]["median_s"]["ours"]
        result = flower({"task": "secagg", "clients": n, "params": M, "seed": SEED})
        result["clients"], result["params"] = n, M
        result["ours_s"] = ours_by_case[(n, M)]
        result["ratio_unmask_to_ours"] = result["unmask_s"] / result["ours_s"]
        secagg.append(result)
        print(
            f"SecAgg+ N={n} P=1M: unmask {result['unmask_s']:.2f} s, "
            f"collect-sum {result['collect_sum_s']:.3f} s, {result['ratio_unmask_to_ours']:.0f}x ours"
        )

    others = {f"{n}x1M": strategies_case(n, M, 3) for n in (10, 100) if n in args.clients}
    path = write_results(
        "fl_aggregation",
        {
            "goals": {"ours_to_numpy_stacked": "<= 1.5", "secagg_unmask_to_ours_at_N100": ">= 1000"},
            "threads": _threads(),
            "load_average_before_after": [load_before, os.getloadavg()],
            "flower_env": env,
            "cases": cases,
            "single_thread_cases": single,
            "secagg_plus": secagg,
            "strategies_1M_median_s": others,
        },
    )
    print(f"results: {path}")
    return 0


def _print_case(r: dict[str, Any]) -> None:
    m = r["median_s"]
    line = (
        f"N={r['clients']:3d} P={r['params'] // M:2d}M  numpy_stacked {m['numpy_stacked']:.4f}  "
        f"ours {m['ours']:.4f} "
        f"({r['ratio_ours_to_numpy_stacked']:.2f}x)  update_matrix {m['ours_update_matrix']:.4f} "
        f"({r['ratio_update_matrix_to_numpy_stacked']:.2f}x)  numpy_list {m['numpy_list']:.4f}"
    )
    if "flower_aggregate" in r:
        line += f"  flower {r['flower_aggregate']['median_s']:.4f}"
    print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
