"""Vertical boosting against central xgboost ``hist`` on the same data, side by side in one run.

Data: scikit-learn ``make_classification`` (30 features, 10 informative, 10 redundant, seed 0),
100,000 training rows and 25,000 test rows; the features split across 3 parties (10 each), the
first holding the labels. Hyperparameters on both sides: 100 trees, ``max_depth=6``,
``learning_rate=0.1``, ``max_bin=256``, xgboost's defaults otherwise.

Cases, interleaved and repeated (``--repeats``, medians), wall and CPU seconds (CPU: the whole
process, all threads):

* ``xgboost_2t`` / ``xgboost_1t``: ``xgboost.train(tree_method="hist", nthread=2|1)`` on the raw
  features; ``dmatrix_s`` is building the ``DMatrix`` (the quantiles are cut in ``train``), ``train_s``
  the training.
* ``ours_tee``: :func:`train_boosting` over :class:`InProcessChannel` (every message really encoded
  and decoded), histograms in the server; it includes each party binning its columns (setup).
* ``ours_party``: the same with ``histograms="party"``.
* ``ours_tee_1t``: ``ours_tee`` on one thread (``ENCLAVEML_VFL_THREADS=1``), against ``xgboost_1t``.
* ``ours_tee_numpy``: ``ours_tee`` without the compiled kernels (``ENCLAVEML_VFL_KERNELS=numpy``).
* ``ours_tee_network``: ``ours_tee`` over the real transport: the server over RA-TLS (simulation TEE)
  on 127.0.0.1 and the three parties as verified HTTPS clients (threads of this process), from the
  parties' first connection (certificate check, fresh attestation) to the trained model.

The goal (issue 6) is ``ours_tee`` within 3x of ``xgboost_2t``; the ratios are given for training
alone and from raw arrays to a model (``dmatrix_s + train_s`` for xgboost). xgboost's OpenMP
threads spin at barriers when another process holds a core, so on a busy machine ``xgboost_2t``
can take many times ``xgboost_1t``: the load average is recorded, and figures taken under load are
not comparable. Test AUCs: ours, xgboost on our bin codes (same bins: equal up to float rounding)
and xgboost on raw values (its own bins).

Run: ``.venv/bin/python -m benchmarks.vertical_boosting`` (a few minutes; ``--quick``: 20,000 rows).
Results in ``benchmarks/results/vertical_boosting.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import xgboost as xgb
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score

from benchmarks._common import write_results
from enclaveml.attestation import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.fl.vertical import _kernels, jobs
from enclaveml.fl.vertical._binning import BinEdges
from enclaveml.fl.vertical._channel import InProcessChannel
from enclaveml.fl.vertical._session import VerticalSession, token_sha256
from enclaveml.fl.vertical.boosting import BoostingParams, BoostingParty, predict_boosting, train_boosting
from enclaveml.fl.vertical.party import ServerConnection
from enclaveml.fl.vertical.plan import VerticalPlan
from enclaveml.fl.vertical.server import serve_vertical

N_FEATURES, N_PARTIES = 30, 3


def make_data(n_train: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray]]:
    x, y = make_classification(
        n_samples=n_train + n_train // 4, n_features=N_FEATURES, n_informative=10, n_redundant=10,
        random_state=0,
    )  # fmt: skip
    xs = {"train": x[:n_train], "test": x[n_train:]}
    ys = {"train": y[:n_train].astype(np.float64), "test": y[n_train:].astype(np.float64)}
    return xs, ys, np.array_split(np.arange(N_FEATURES), N_PARTIES)


def channels(xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], columns: list[np.ndarray]) -> list[Any]:
    parties = [
        BoostingParty(f"party{i}", {k: v[:, c] for k, v in xs.items()}, labels=ys if i == 0 else None)
        for i, c in enumerate(columns)
    ]
    out = [InProcessChannel(p) for p in parties]
    for channel in out:
        channel.record = False  # keep the bytes' encoding and decoding, not a copy of them
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def xgb_params(params: BoostingParams, n_threads: int) -> dict[str, Any]:
    return {
        "objective": params.objective, "tree_method": "hist", "eta": params.learning_rate,
        "max_depth": params.max_depth, "max_bin": params.max_bin, "nthread": n_threads,
    }  # fmt: skip


def run_xgboost(
    xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], params: BoostingParams, n_threads: int
) -> dict[str, Any]:
    d_wall, d_cpu, dtrain = timed(lambda: xgb.DMatrix(xs["train"], label=ys["train"], nthread=n_threads))
    t_wall, t_cpu, booster = timed(
        lambda: xgb.train(xgb_params(params, n_threads), dtrain, num_boost_round=params.n_estimators)
    )
    p = booster.predict(xgb.DMatrix(xs["test"], nthread=n_threads))
    return {
        "dmatrix_s": d_wall,
        "train_s": t_wall,
        "cpu_s": d_cpu + t_cpu,
        "auc": roc_auc_score(ys["test"], p),
    }


def run_ours(
    xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], columns: list[np.ndarray], params: BoostingParams
) -> dict[str, Any]:
    chans = channels(xs, ys, columns)
    wall, cpu, model = timed(lambda: train_boosting(chans[0], chans[1:], params))
    p = predict_boosting(model, chans, "test")
    return {"train_s": wall, "cpu_s": cpu, "auc": roc_auc_score(ys["test"], p)}


def run_ours_network(
    xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], columns: list[np.ndarray], params: BoostingParams
) -> dict[str, Any]:
    """``ours_tee`` with the server over RA-TLS and the parties connecting as verified clients."""
    names = [f"party{i}" for i in range(len(columns))]
    plan = VerticalPlan(task="train", parties=tuple(names), algorithm="boosting", params=params.to_dict())
    tokens = {name: os.urandom(16).hex() for name in names}
    session = VerticalSession(plan, {n: token_sha256(t) for n, t in tokens.items()}, jobs.server_job(plan))
    key = SimulationKey.generate()
    provider = SimulationProvider(key=key, entry_point="benchmark vfl server", config=plan.to_dict())
    policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([provider.measurement])))
    parties = [
        BoostingParty(name, {k: v[:, c] for k, v in xs.items()}, labels=ys if i == 0 else None)
        for i, (name, c) in enumerate(zip(names, columns, strict=True))
    ]
    running = serve_vertical(session, provider)

    def party(endpoint: BoostingParty) -> None:
        with ServerConnection(
            running.url,
            credential=tokens[endpoint.name],
            policy=policy,
            verifier=SimulationVerifier(key.public_key()),
            expected_plan=plan,
        ) as connection:
            connection.serve(endpoint)  # fmt: skip

    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=party, args=(p,)) for p in parties]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    running.stop()
    if session.state != "succeeded":
        raise SystemExit(f"the networked run failed: {session.outcome()}")
    p = predict_boosting(session.result.training, [InProcessChannel(q) for q in parties], "test")
    return {"train_s": wall, "cpu_s": cpu, "auc": roc_auc_score(ys["test"], p)}


def xgboost_on_codes(
    xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], columns: list[np.ndarray], params: BoostingParams
) -> float:
    """Test AUC of xgboost trained on our bin codes: the "same bins" reference."""
    codes = {k: [] for k in xs}  # type: dict[str, list[np.ndarray]]
    for c in columns:
        edges = BinEdges.fit(xs["train"][:, c], params.max_bin)
        for k, v in xs.items():
            block = edges.transform(v[:, c]).astype(np.float64)
            block[block == params.max_bin] = np.nan
            codes[k].append(block)
    dtrain = xgb.DMatrix(np.hstack(codes["train"]), label=ys["train"], nthread=1)
    booster = xgb.train(xgb_params(params, 1), dtrain, num_boost_round=params.n_estimators)
    return float(roc_auc_score(ys["test"], booster.predict(xgb.DMatrix(np.hstack(codes["test"])))))


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="training rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 2 repeats")
    parser.add_argument("--no-numpy", action="store_true", help="skip the run without compiled kernels")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 20_000, 2
    params = BoostingParams(n_estimators=100, max_depth=6, learning_rate=0.1, max_bin=256)
    xs, ys, columns = make_data(args.rows)
    # The networked case uses the simulation TEE; its warning is for deployments, not this benchmark.
    logging.getLogger("enclaveml.attestation").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    # Warm-up: numba compiles (or loads its cache), xgboost starts its thread pool.
    small = {k: v[:2000] for k, v in xs.items()}, {k: v[:2000] for k, v in ys.items()}
    run_ours(*small, columns, BoostingParams(n_estimators=2))
    run_xgboost(*small, BoostingParams(n_estimators=2), 2)

    cases: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "xgboost_2t", "xgboost_1t", "ours_tee", "ours_tee_1t", "ours_party", "ours_tee_numpy",
            "ours_tee_network",
        )
    }  # fmt: skip
    for repeat in range(args.repeats):
        cases["xgboost_2t"].append(run_xgboost(xs, ys, params, 2))
        cases["ours_tee"].append(run_ours(xs, ys, columns, params))
        cases["xgboost_1t"].append(run_xgboost(xs, ys, params, 1))
        with environment("ENCLAVEML_VFL_THREADS", "1"):
            cases["ours_tee_1t"].append(run_ours(xs, ys, columns, params))
        cases["ours_party"].append(
            run_ours(xs, ys, columns, BoostingParams(**{**params.to_dict(), "histograms": "party"}))
        )
        cases["ours_tee_network"].append(run_ours_network(xs, ys, columns, params))
        if not args.no_numpy:
            with environment("ENCLAVEML_VFL_KERNELS", "numpy"):
                cases["ours_tee_numpy"].append(run_ours(xs, ys, columns, params))
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(f"{k} {v[-1]['train_s']:.2f}s" for k, v in cases.items() if v),
            file=sys.stderr,
        )

    summary: dict[str, Any] = {}
    for name, runs in cases.items():
        if not runs:
            continue
        summary[name] = {
            "train_s": median(runs, "train_s"), "cpu_s": median(runs, "cpu_s"), "auc": runs[0]["auc"],
            "runs_train_s": [round(r["train_s"], 3) for r in runs],
        }  # fmt: skip
        if "dmatrix_s" in runs[0]:
            summary[name]["dmatrix_s"] = median(runs, "dmatrix_s")
            summary[name]["end_to_end_s"] = median(runs, "dmatrix_s") + summary[name]["train_s"]
    xgb2 = summary["xgboost_2t"]
    ratios = {
        f"{name}_over_xgboost_2t": {
            "train": summary[name]["train_s"] / xgb2["train_s"],
            "end_to_end": summary[name]["train_s"] / xgb2["end_to_end_s"],
            "cpu": summary[name]["cpu_s"] / xgb2["cpu_s"],
        }
        for name in ("ours_tee", "ours_party", "ours_tee_numpy", "ours_tee_network") if name in summary
    }  # fmt: skip
    ratios["ours_tee_1t_over_xgboost_1t"] = {
        "train": summary["ours_tee_1t"]["train_s"] / summary["xgboost_1t"]["train_s"],
        "end_to_end": summary["ours_tee_1t"]["train_s"] / summary["xgboost_1t"]["end_to_end_s"],
        "cpu": summary["ours_tee_1t"]["cpu_s"] / summary["xgboost_1t"]["cpu_s"],
    }
    auc_codes = xgboost_on_codes(xs, ys, columns, params)
    result = {
        "data": {"train_rows": args.rows, "test_rows": args.rows // 4, "features": N_FEATURES,
                 "parties": N_PARTIES},
        "params": params.to_dict(),
        "threads": {"xgboost_2t": 2, "xgboost_1t": 1, "ours_tee_1t": 1,
                    "ours": _kernels.threads() if _kernels.compiled() else 1,
                    "ours_kernels": "numba" if _kernels.compiled() else "numpy"},
        "repeats": args.repeats,
        "cases": summary,
        "ratios": ratios,
        "goal": "ours_tee / xgboost_2t <= 3 (wall, training)",
        "auc": {"ours_tee": summary["ours_tee"]["auc"], "xgboost_on_our_codes": auc_codes,
                "xgboost_raw_own_bins": xgb2["auc"],
                "ours_minus_xgboost_same_bins": summary["ours_tee"]["auc"] - auc_codes},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip
    path = write_results("vertical_boosting", result)
    for name, values in summary.items():
        print(
            f"{name:15s} train {values['train_s']:.3f}s  cpu {values['cpu_s']:.3f}s  auc {values['auc']:.5f}"
        )
    for name, values in ratios.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    print(f"AUC ours {summary['ours_tee']['auc']:.5f}, xgboost same bins {auc_codes:.5f}; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
