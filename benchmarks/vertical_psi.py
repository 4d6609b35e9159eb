"""PSI for N x N IDs: our TEE mode and cryptographic mode against bare openmined-psi, in one run.

Two sets of ``--size`` random string IDs (``cust-`` and 16 hex digits) sharing ``--overlap`` of them,
each shuffled. Three cases, each timed in wall clock (``time.perf_counter``) and in CPU time of the
whole process (``time.process_time``, all threads):

* ``openmined``: the bare openmined-psi 2.0.4 client/server exchange in one direction (the client
  learns the intersection): server setup over its set (``DataStructure.RAW``, exact, what our
  cryptographic mode uses), client request, server response, client intersection, each message
  serialised to bytes and parsed back. Inputs are already bytes. This is the reference of the goal
  (TEE mode >= 10x faster; ``/work/shared/BASELINES.md`` quotes about 450 s at 1M x 1M).
* ``tee``: our TEE mode end to end: two :class:`PsiParty` objects built from the string IDs
  (normalisation and duplicate checks included), :func:`run_psi` over ``InProcessChannel``, so
  every message is really encoded to CBOR and decoded; both parties end with their aligned rows.
  Median of ``--repeats`` runs (it is short); each run records the time to build the parties and
  the time of ``run_psi``.
* ``ecdh``: our cryptographic mode end to end, the same way (both directions: 2 PSI runs for 2
  parties, so about twice the work of ``openmined``; the parties' calls run concurrently where the
  protocol allows, and openmined-psi releases the GIL, so wall time may be below CPU time).

Checks: all three find the known overlap; both modes give identical aligned rows at each party,
and the rows align (equal IDs at every position).

Run: ``.venv/bin/python -m benchmarks.vertical_psi`` (1M x 1M: about 20 minutes, most of it in
openmined-psi and the cryptographic mode; run it on a quiet machine and check the recorded load).
``--size 100000`` for a quick run. Results in ``benchmarks/results/vertical_psi.json`` (the 1M run)
or ``vertical_psi_<size>.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import private_set_intersection.python as openmined

from benchmarks._common import write_results
from enclaveml.crypto import KeyHandle
from enclaveml.fl.vertical._channel import InProcessChannel
from enclaveml.fl.vertical.psi import PsiParty, run_psi

SEED = 20261207
GOAL_RATIO = 10.0


def make_sets(size: int, overlap: float, seed: int) -> tuple[list[str], list[str], int]:
    """Two shuffled sets of ``size`` IDs with ``round(size * overlap)`` in common."""
    rng = np.random.default_rng(seed)
    common = round(size * overlap)
    values = rng.choice(2**62, size=2 * size - common, replace=False)
    ids = [f"cust-{v:016x}" for v in values.tolist()]
    a = ids[:size]
    b = ids[:common] + ids[size:]
    return [a[i] for i in rng.permutation(size)], [b[i] for i in rng.permutation(size)], common


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``fn()``, its wall and CPU seconds, and the 1-minute load average before and after it."""
    gc.collect()
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def bare_openmined(client_ids: list[bytes], server_ids: list[bytes]) -> tuple[int, dict[str, float]]:
    """One direction of openmined-psi, phase by phase, with the wire encodings."""
    phases: dict[str, float] = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        phases[name] = time.perf_counter() - started
        return result

    client = openmined.client.CreateWithNewKey(True)
    server = openmined.server.CreateWithNewKey(True)
    setup = phase(
        "server_setup_s",
        lambda: server.CreateSetupMessage(
            0.0, len(client_ids), server_ids, openmined.DataStructure.RAW
        ).SerializeToString(),
    )
    request = phase("client_request_s", lambda: client.CreateRequest(client_ids).SerializeToString())

    def respond() -> bytes:
        parsed = openmined.Request()
        parsed.ParseFromString(request)
        return bytes(server.ProcessRequest(parsed).SerializeToString())

    response = phase("server_response_s", respond)

    def intersect() -> list[int]:
        parsed_setup, parsed_response = openmined.ServerSetup(), openmined.Response()
        parsed_setup.ParseFromString(setup)
        parsed_response.ParseFromString(response)
        return list(client.GetIntersection(parsed_setup, parsed_response))

    found = phase("client_intersection_s", intersect)
    return len(found), phases


def ours(
    mode: str, a: list[str], b: list[str], key: KeyHandle
) -> tuple[list[np.ndarray], int, dict[str, float]]:
    """Build both parties and run PSI; the aligned rows, the size and the phase times."""
    started = time.perf_counter()
    parties = [PsiParty("a", a, key=key, parties=2), PsiParty("b", b, key=key, parties=2)]
    built = time.perf_counter()
    summary = run_psi([InProcessChannel(p, record=False) for p in parties], mode)  # type: ignore[arg-type]
    done = time.perf_counter()
    phases = {"build_parties_s": built - started, "run_psi_s": done - built}
    return [p.aligned_rows for p in parties], summary.intersection_size, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="IDs per party (default 1M)")
    parser.add_argument("--overlap", type=float, default=0.5, help="fraction in common (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="TEE-mode runs (median; default 3)")
    parser.add_argument("--skip-openmined", action="store_true", help="leave out the bare openmined run")
    args = parser.parse_args()

    a, b, common = make_sets(args.size, args.overlap, SEED)
    a_bytes, b_bytes = [i.encode() for i in a], [i.encode() for i in b]
    key = KeyHandle.generate("vfl-psi")
    load_before = os.getloadavg()
    print(f"{args.size} x {args.size} IDs, {common} in common; load {load_before[0]:.2f}", flush=True)

    cases: dict[str, Any] = {}
    tee_runs = []
    for _ in range(args.repeats):
        (tee_rows, tee_size, tee_phases), times = timed(lambda: ours("tee", a, b, key))
        tee_runs.append({**times, **tee_phases})
        print(f"tee: {times['wall_s']:.2f} s wall, {times['cpu_s']:.2f} s CPU", flush=True)
    cases["tee"] = {
        "wall_s": statistics.median(r["wall_s"] for r in tee_runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in tee_runs),
        "runs": tee_runs,
        "intersection_size": tee_size,
    }

    (ecdh_rows, ecdh_size, ecdh_phases), times = timed(lambda: ours("ecdh", a, b, key))
    cases["ecdh"] = {**times, **ecdh_phases, "intersection_size": ecdh_size}
    print(f"ecdh: {times['wall_s']:.1f} s wall, {times['cpu_s']:.1f} s CPU", flush=True)

    if not args.skip_openmined:
        (om_size, om_phases), times = timed(lambda: bare_openmined(a_bytes, b_bytes))
        cases["openmined"] = {**times, "phases": om_phases, "intersection_size": om_size}
        print(f"openmined: {times['wall_s']:.1f} s wall, {times['cpu_s']:.1f} s CPU", flush=True)

    same_rows = all(np.array_equal(t, e) for t, e in zip(tee_rows, ecdh_rows, strict=True))
    aligned = [a[i] for i in tee_rows[0]] == [b[i] for i in tee_rows[1]]
    sizes_ok = all(case["intersection_size"] == common for case in cases.values())
    if not (same_rows and aligned and sizes_ok):
        raise SystemExit("PSI results disagree: see the sizes above")

    results: dict[str, Any] = {
        "size": args.size,
        "overlap": common,
        "goal_tee_speedup_vs_openmined": GOAL_RATIO,
        "openmined_psi_version": openmined.__version__,
        "cases": cases,
        "checks": {"modes_identical": same_rows, "rows_align": aligned, "sizes_match_overlap": sizes_ok},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    if "openmined" in cases:
        results["tee_speedup_vs_openmined"] = {
            "wall": cases["openmined"]["wall_s"] / cases["tee"]["wall_s"],
            "cpu": cases["openmined"]["cpu_s"] / cases["tee"]["cpu_s"],
        }
        results["ecdh_over_openmined"] = {
            "wall": cases["ecdh"]["wall_s"] / cases["openmined"]["wall_s"],
            "cpu": cases["ecdh"]["cpu_s"] / cases["openmined"]["cpu_s"],
        }
    name = "vertical_psi" if args.size == 1_000_000 else f"vertical_psi_{args.size}"
    print(write_results(name, results))


if __name__ == "__main__":
    main()
