"""FL aggregation time on the aggregator's real path, against numpy, Flower's ``aggregate`` and SecAgg+.

For N = 10, 50, 100 clients x P = 1M and 10M float32 parameters (8 arrays per model, see
``benchmarks/_fl_data.py``), ``--repeats`` rounds of one :class:`~enclaveml.fl.aggregator.Aggregator`
(FedAvg, default validation), medians over rounds:

* per upload, while the round is open: ``decode_s``, ``decode_update(body, copy=False)`` of the
  CBOR body (what the HTTPS route does; TLS and HTTP are not included) and ``submit_s``,
  ``Aggregator.submit`` (layout check, copy into the client's row of the round's matrix with the
  norm of its change in the same pass, bookkeeping);
* ``aggregator_close`` (*ours*): ``Aggregator.poll()`` closing the round once the N uploads are
  in (one more enrolled client never uploads, so the round closes at its deadline, in ``poll``):
  validation (norm rules), FedAvg over the rows, taking over the new global model and freeing the
  round's matrix. No checkpoint store: the sealed checkpoint write is measured separately
  (``close_with_sealed_checkpoint_s``, one round with a store at N = 10);
* ``numpy_stacked``: ``weights @ stacked`` on a ready (N x P) float32 matrix: the plain numpy
  weighted average and the goal's reference (ours / numpy_stacked <= 1.5), interleaved with the
  close (alternating which of the two runs first after the uploads);
* ``flower_aggregate``: ``flwr.server.strategy.aggregate.aggregate`` on identical data, in a
  subprocess under ``benchmarks/.venv-flwr`` (see ``benchmarks/_flower_env.py``; Flower's pins
  conflict with ours, so it never enters ``.venv``).

Wall-clock (``perf_counter``) and CPU time (``process_time``, all threads) are both recorded; CPU
time includes OpenBLAS worker threads spinning while they wait for work, so with more than one
thread it favours whichever call runs after a pause, and only the one-core ratio is a clean CPU
measure.
Then Flower's SecAgg+ server unmasking for the same N at P = 1M (each once; N = 100 takes a few
minutes), as described in ``benchmarks/_flower_worker.py``, against ours (goal >= 1000x), and
the other strategies closing a round of the aggregator at P = 1M. The ours-vs-numpy cases run a
second time in a child process with one thread everywhere (``OPENBLAS_NUM_THREADS=1``,
``ENCLAVEML_FL_THREADS=1``): on a shared machine that is the steadier comparison.

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
from enclaveml.crypto import KeyHandle
from enclaveml.fl._checkpoint import CheckpointStore
from enclaveml.fl._wire import decode_update, encode_update
from enclaveml.fl.aggregator import Aggregator
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
from enclaveml.fl.strategy import Strategy

SEED = 20261121
M = 1_000_000
WORKER = Path(__file__).resolve().parent / "_flower_worker.py"


class _Clock:
    """The aggregator's injectable clock: each round's deadline passes when the benchmark says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()`` after a garbage collection."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _round_aggregator(
    strategy: Strategy, g: list[np.ndarray], n: int, rounds: int, **kw: Any
) -> tuple[Aggregator, _Clock]:
    """An aggregator for ``rounds`` rounds of ``n`` uploads, closed by ``poll`` at the deadline."""
    clock = _Clock()
    aggregator = Aggregator(strategy, g, rounds=rounds, min_clients=n, round_timeout_s=1.0, clock=clock, **kw)
    for i in range(n + 1):  # "c{n}" never uploads
        aggregator.enrol(f"c{i:03d}")
    return aggregator, clock


def _client_data(n: int, p: int) -> tuple[list[np.ndarray], list[int], np.ndarray, np.ndarray]:
    g = data.global_weights(p, SEED)
    counts = data.num_examples(n, SEED)
    stacked = np.empty((n, p), dtype=np.float32)
    for i in range(n):
        data.fill_client(stacked[i], i, p, SEED)
    coeffs = (np.array(counts, np.float64) / sum(counts)).astype(np.float32)
    return g, counts, stacked, coeffs


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ours_case(n: int, p: int, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    g, counts, stacked, coeffs = _client_data(n, p)
    aggregator, clock = _round_aggregator(FedAvg(), g, n, repeats + 1)
    wall: dict[str, list[float]] = {"aggregator_close": [], "numpy_stacked": []}
    cpu: dict[str, list[float]] = {"aggregator_close": [], "numpy_stacked": []}
    decode_s, submit_s = [], []
    for round_ in range(1, repeats + 2):  # round 1 warms up
        for i in range(n):
            body = encode_update(round_, data.split(stacked[i], p), counts[i], {"loss": 0.5})
            started = time.perf_counter()
            message = decode_update(body, copy=False)
            decoded = time.perf_counter()
            aggregator.submit(f"c{i:03d}", round_, message.weights, message.num_examples, message.metrics)
            if round_ > 1:
                decode_s.append(decoded - started)
                submit_s.append(time.perf_counter() - decoded)
            del body, message
        clock.now += 2.0
        steps: list[tuple[str, Callable[[], object]]] = [
            ("aggregator_close", aggregator.poll),
            ("numpy_stacked", lambda: coeffs @ stacked),
        ]
        for name, fn in steps if round_ % 2 else steps[::-1]:
            w, c = _timed(fn)
            if round_ > 1:
                wall[name].append(w)
                cpu[name].append(c)
        assert aggregator.completed_rounds == round_
    ours = np.concatenate([w.reshape(-1) for w in aggregator.global_model().weights])
    reference = np.zeros(p, dtype=np.float64)  # row by row: float64 @ stacked would copy it all
    for c, row in zip(np.array(counts, np.float64) / sum(counts), stacked, strict=True):
        reference += c * row
    medians = {k: _median(v) for k, v in wall.items()}
    cpu_medians = {k: _median(v) for k, v in cpu.items()}
    mins = {k: min(v) for k, v in wall.items()}
    upload_mb = p * 4 / 1e6
    result = {
        "clients": n,
        "params": p,
        "median_s": medians,
        "min_s": mins,
        "cpu_median_s": cpu_medians,
        "ratio_ours_to_numpy_stacked": medians["aggregator_close"] / medians["numpy_stacked"],
        # Minimums and CPU time are less disturbed by other work on a shared machine.
        "ratio_ours_to_numpy_stacked_of_minimums": mins["aggregator_close"] / mins["numpy_stacked"],
        "ratio_ours_to_numpy_stacked_cpu": cpu_medians["aggregator_close"] / cpu_medians["numpy_stacked"],
        "per_upload": {
            "decode_s": _median(decode_s),
            "submit_s": _median(submit_s),
            "submit_gb_per_s": upload_mb / 1e3 / _median(submit_s),
            "round_total_s": (_median(decode_s) + _median(submit_s)) * n,
        },
        "max_abs_diff_ours_vs_float64": float(np.max(np.abs(ours - reference))),
        "rejected": sum(len(r.rejected) for r in aggregator.history),
    }
    return result, ours


def checkpoint_case(p: int, n: int = 10) -> dict[str, float]:
    """A round closed without and one with a sealed checkpoint store (the difference is the write)."""
    g, counts, stacked, _ = _client_data(n, p)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp), KeyHandle.generate("fl-checkpoint"))
        for label, options in (("close_s", {}), ("close_with_sealed_checkpoint_s", {"checkpoints": store})):
            aggregator, clock = _round_aggregator(FedAvg(), g, n, 2, **options)
            for round_ in (1, 2):  # the second round is the one measured
                for i in range(n):
                    aggregator.submit(f"c{i:03d}", round_, data.split(stacked[i], p), counts[i])
                clock.now += 2.0
                out[label] = _timed(aggregator.poll)[0]
    out["sealed_checkpoint_write_s"] = out["close_with_sealed_checkpoint_s"] - out["close_s"]
    return out


def flower(task: dict[str, Any]) -> dict[str, Any]:
    command = [str(_flower_env.python()), str(WORKER), json.dumps(task)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=WORKER.parent.parent)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def flower_case(n: int, p: int, repeats: int, ours: np.ndarray) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flower.npy"
        task = {"task": "aggregate", "clients": n, "params": p, "seed": SEED, "repeats": repeats}
        result = flower({**task, "out": str(path)})
        theirs = np.load(path)
    result["max_abs_diff_vs_ours"] = float(np.max(np.abs(theirs - ours)))
    return result


def strategies_case(n: int, p: int, repeats: int) -> dict[str, float]:
    """Median seconds of ``Aggregator.poll`` closing a round, per strategy, and numpy for scale."""
    g, counts, stacked, coeffs = _client_data(n, p)
    strategies: list[Strategy] = [
        FedAvg(), FedAdam(), CoordinateMedian(), TrimmedMean(0.1),
        Krum(max(1, n // 10), multi=max(1, n // 2)), NormClipping(FedAvg(), max_norm=1.0),
        CentralDP(FedAvg(), 1.0, 1.0, 1e-5),
    ]  # fmt: skip
    runs = {s.name: _round_aggregator(s, g, n, repeats + 1) for s in strategies}
    times: dict[str, list[float]] = {name: [] for name in [*runs, "numpy_stacked"]}
    for round_ in range(1, repeats + 2):
        for name, (aggregator, clock) in runs.items():
            for i in range(n):
                aggregator.submit(f"c{i:03d}", round_, data.split(stacked[i], p), counts[i])
            clock.now += 2.0
            elapsed = _timed(aggregator.poll)[0]
            if round_ > 1:
                times[name].append(elapsed)
        elapsed = _timed(lambda: coeffs @ stacked)[0]
        if round_ > 1:
            times["numpy_stacked"].append(elapsed)
    return {k: _median(v) for k, v in times.items()}


def single_thread_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ours-vs-numpy cases again with one thread everywhere (our blocks and BLAS).

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
    return repeats if params <= M else max(3, repeats // 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--params-m", type=int, nargs="+", default=[1, 10], help="millions of parameters")
    parser.add_argument("--secagg-clients", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=11, help="rounds measured at 1M (10M: half)")
    parser.add_argument("--no-flower", action="store_true", help="skip everything that needs the Flower venv")
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 at P = 1M; SecAgg+ at N = 10")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the one-core comparison")
    parser.add_argument("--single-thread-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.params_m, args.secagg_clients = [10, 100], [1], [10]
        args.repeats = min(args.repeats, 5)
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
                    result["flower_aggregate"]["median_s"] / result["median_s"]["aggregator_close"]
                )
            ours_by_case[(n, p)] = result["median_s"]["aggregator_close"]
            cases.append(result)
            _print_case(result)

    single = [] if args.no_single_thread else single_thread_cases(args)
    for r in single:
        print("one core:", end=" ")
        _print_case(r)

    checkpoints = {f"10x{m}M": checkpoint_case(m * M) for m in args.params_m}
    print("sealed checkpoint:", checkpoints, flush=True)
    others = {f"{n}x1M": strategies_case(n, M, 3) for n in (10, 100) if n in args.clients}
    print("strategies (close s):", others, flush=True)

    secagg = []
    for n in [] if env is None else args.secagg_clients:
        if (n, M) not in ours_by_case:
            ours_by_case[(n, M)] = ours_case(n, M, args.repeats)[0]["median_s"]["aggregator_close"]
        result = flower({"task": "secagg", "clients": n, "params": M, "seed": SEED})
        result["clients"], result["params"] = n, M
        result["ours_s"] = ours_by_case[(n, M)]
        result["ratio_unmask_to_ours"] = result["unmask_s"] / result["ours_s"]
        secagg.append(result)
        print(
            f"SecAgg+ N={n} P=1M: unmask {result['unmask_s']:.2f} s, "
            f"collect-sum {result['collect_sum_s']:.3f} s, {result['ratio_unmask_to_ours']:.0f}x ours",
            flush=True,
        )

    path = write_results(
        "fl_aggregation",
        {
            "goals": {"ours_to_numpy_stacked": "<= 1.5", "secagg_unmask_to_ours_at_N100": ">= 1000"},
            "ours": "Aggregator.poll() closing a round of N uploads submitted through Aggregator.submit",
            "threads": _threads(),
            "load_average_before_after": [load_before, os.getloadavg()],
            "flower_env": env,
            "cases": cases,
            "single_thread_cases": single,
            "checkpoint_10_clients": checkpoints,
            "secagg_plus": secagg,
            "strategies_close_1M_median_s": others,
        },
    )
    print(f"results: {path}")
    return 0


def _print_case(r: dict[str, Any]) -> None:
    m, u = r["median_s"], r["per_upload"]
    line = (
        f"N={r['clients']:3d} P={r['params'] // M:2d}M  numpy {m['numpy_stacked']:.4f}  "
        f"close {m['aggregator_close']:.4f} ({r['ratio_ours_to_numpy_stacked']:.2f}x, "
        f"min {r['ratio_ours_to_numpy_stacked_of_minimums']:.2f}x, "
        f"cpu {r['ratio_ours_to_numpy_stacked_cpu']:.2f}x)"
        f"  per upload: decode {u['decode_s']:.4f} submit {u['submit_s']:.4f}"
    )
    if "flower_aggregate" in r:
        line += f"  flower {r['flower_aggregate']['median_s']:.4f}"
    print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
