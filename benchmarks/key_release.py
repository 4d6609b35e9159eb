"""Key releases per second from a real broker on 127.0.0.1 over HTTPS (goal: >= 300/s on 2 cores).

One *release* is the protocol of ``docs/kbs-protocol.md`` on a kept-alive TLS connection:
``POST /v1/challenge``, evidence binding ``SHA-256(nonce || public_key)``, ``POST
/v1/keys/bench/release``, and an HPKE ciphertext of the key back. The broker is
``enclaveml.kms.server.run_broker`` (uvloop, httptools, SQLite) in its own process group;
its CPU time (all its processes) is read from /proc for the measuring window and reported per
release, which is what decides how many releases a broker core serves whatever the clients
cost. A release counts when its answer arrived inside the window.

The clients are deliberately light, because on this machine they share the 2 cores with the
broker while real workloads run on their own TEE hosts: separate processes (forked before the
window), several threads each, one kept-alive TLS connection per thread (stdlib ``ssl``,
pinned certificate, HTTP/1.1 framed by hand: ``http.client`` parses headers with the email
package), JSON bodies built by hand. The workload's ephemeral HPKE key pairs come from a pool
generated before the window (the broker cannot tell, and does the same work, for any key);
the simulation evidence is made per release (it must bind the fresh nonce); the HPKE
ciphertexts are decrypted and checked after the window, every one of them (a wrong key fails
the run). ``other_cpu_cores`` is what the rest of the machine used meanwhile: on a shared
machine, compare runs taken side by side.

Cases (``--quick`` runs the first and the DCAP ones only):

* ``simulation/<KEM>/<fs>/<n>w``: simulation evidence, a measurement policy under
  ``UnsafeAllowSimulation``, the full release path including the HPKE seal, with the database
  on disk (fsync per durable commit) or tmpfs, served by ``n`` broker processes.
* ``dcap/https-denied-at-binding/disk/1w``: a broker configured for DCAP only (verification
  time pinned to the vector's validity window). Clients send the recorded TDX quote
  ``tests/vectors/data/tdx/phala_tdx_v4``; its report data cannot bind our nonce, so every
  attempt ends in ``403 binding`` after the broker consumed the nonce, verified the quote with
  dcap-qvl, checked the binding and wrote the denial to the audit log: everything a real DCAP
  release costs except the policy check and the HPKE seal (both microseconds).
* ``broker/in-process``: broker CPU per release without HTTP (``KeyBroker.challenge`` and
  ``release`` called directly, simulation evidence made beforehand), the floor under the HTTPS
  figures.
* ``dcap/in-process``: DCAP verify only, verify + binding, and ``KeyBroker.release`` ending in
  the binding denial, without HTTP.

Run: ``.venv/bin/python -m benchmarks.key_release`` (about two minutes); results in
``benchmarks/results/key_release.json``. Exit status 0 when a simulation case reached the goal.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import rate, write_results

GOAL = 300.0
VECTORS = Path(__file__).parent.parent / "tests" / "vectors" / "data"
CASE = json.loads((VECTORS / "expected.json").read_text())["cases"]["tdx/phala_tdx_v4"]
QUOTE, COLLATERAL = VECTORS / "tdx" / CASE["quote"], VECTORS / "tdx" / CASE["collateral"]
PINNED_NOW = int(CASE["recommended_now_unix"])
WORKLOAD = {"entry_point": "bench", "config": {"benchmark": "key_release"}}
HYBRID, X25519 = "MLKEM768-X25519", "X25519"
KEY_POOL = 64  # ephemeral key pairs per client thread, generated before the window


class PinnedTime:
    """A verifier that always verifies as of ``now``: the recorded collateral has long expired."""

    def __init__(self, inner: Any, now: int) -> None:
        self.inner, self.now = inner, now

    def verify(self, evidence: Any, *, now: Any = None) -> Any:
        return self.inner.verify(evidence, now=self.now)


def _verifier(mode: str, sim_key: Path) -> Any:
    from enclaveml.attestation import DcapVerifier, EvidenceVerifier, LocalCollateral

    if mode == "dcap":
        return EvidenceVerifier(dcap=PinnedTime(DcapVerifier(LocalCollateral(COLLATERAL)), PINNED_NOW))
    from enclaveml.attestation.simulation import SimulationKey, SimulationVerifier

    return EvidenceVerifier(simulation=SimulationVerifier(SimulationKey.load_or_create(sim_key).public_key()))


def _policy(mode: str) -> Any:
    from enclaveml.attestation.policy import AllOf, DebugMode, MeasurementAllowlist, UnsafeAllowSimulation

    if mode == "dcap":
        return AllOf(MeasurementAllowlist([CASE["report"]["mr_td"]]), DebugMode())
    from enclaveml.attestation.simulation import workload_measurement

    measurement = workload_measurement(WORKLOAD["entry_point"], WORKLOAD["config"])  # type: ignore[arg-type]
    return UnsafeAllowSimulation(AllOf(MeasurementAllowlist([measurement])))


# -- the broker -----------------------------------------------------------------------------------


def serve(spec: dict[str, Any]) -> None:
    """Child process: run the broker described by ``spec`` until terminated."""
    from enclaveml.kms._rootkey import load_root_key
    from enclaveml.kms.server import BrokerConfig, run_broker

    config = BrokerConfig(
        db_path=Path(spec["db"]),
        root_key=load_root_key(spec["root_key"]),
        verifier=_verifier(spec["mode"], Path(spec["sim_key"])),
    )
    extra = {"workers": spec["workers"]} if spec["workers"] > 1 else {}
    run_broker(
        config,
        "127.0.0.1",
        spec["port"],
        certfile=spec["cert"],
        keyfile=spec["key"],
        log_level="warning",
        **extra,
    )


def _prepare(work: Path, mode: str, workers: int) -> dict[str, Any]:
    from enclaveml.kms._rootkey import generate_root_key_file, load_root_key
    from enclaveml.kms._service import KeyBroker
    from enclaveml.kms._storage import SqliteKeyStore
    from enclaveml.kms.server import create_self_signed_certificate

    (work / "db").mkdir()
    spec: dict[str, Any] = {
        "mode": mode,
        "workers": workers,
        "db": str(work / "db" / "kbs.db"),
        "root_key": str(generate_root_key_file(work / "secrets" / "root.key")),
        "cert": str(work / "cert.pem"),
        "key": str(work / "secrets" / "tls.key"),
        "sim_key": str(work / "secrets" / "sim.pem"),
    }
    create_self_signed_certificate(spec["cert"], spec["key"])
    store = SqliteKeyStore(spec["db"])
    try:
        KeyBroker(store, load_root_key(spec["root_key"]), _verifier(mode, Path(spec["sim_key"]))).create_key(
            "bench", _policy(mode)
        )
    finally:
        store.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        spec["port"] = probe.getsockname()[1]
    return spec


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_group_cpu(pgid: int) -> float:
    """CPU seconds of every live process in the group (the broker and its worker processes)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine outside idle and iowait (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wait_until_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the broker exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the broker did not start listening")


# -- the light client -----------------------------------------------------------------------------


def _key_pair(kem: str) -> tuple[Any, bytes]:
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    classical = x25519.X25519PrivateKey.generate()
    public = classical.public_key().public_bytes_raw()
    if kem == X25519:
        return classical, public
    post_quantum = mlkem.MLKEM768PrivateKey.generate()
    return (
        hpke.MLKEM768X25519PrivateKey(post_quantum, classical),
        post_quantum.public_key().public_bytes_raw() + public,
    )


class _Connection:
    """One kept-alive HTTPS connection: stdlib ``ssl`` socket, HTTP/1.1 framed by hand.

    ``http.client`` parses every response's headers with the email package, which on these
    2 cores would be CPU taken from the broker; the broker always answers with a
    Content-Length, so a status line, the headers and that many bytes is all there is to read.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        self.sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        lines = self.buffer[:end].split(b"\r\n")
        self.buffer = self.buffer[end + 4 :]
        status, length = int(lines[0].split()[1]), -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise RuntimeError("the broker answered without a Content-Length")
        while len(self.buffer) < length:
            self._receive()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, json.loads(data)

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _client_process(args: tuple[dict[str, Any], int, float, float, str]) -> dict[str, Any]:
    """Worker process: ``threads`` clients releasing in a loop; counts answers inside [start, end)."""
    spec, threads, start, seconds, kem = args
    end = start + seconds
    from enclaveml.attestation.evidence import Evidence

    if spec["mode"] == "dcap":
        quote = Evidence.from_bytes(QUOTE.read_bytes()).to_bytes()
        provider: Any = None
    else:
        from enclaveml.attestation.simulation import SimulationProvider

        provider = SimulationProvider(key_path=spec["sim_key"], **WORKLOAD)  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=spec["cert"])
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[list[str]] = [[] for _ in range(threads)]
    opened: list[list[tuple[int, str, int, bytes]]] = [[] for _ in range(threads)]
    pools = [[_key_pair(kem) for _ in range(KEY_POOL)] for _ in range(threads)]
    path = "/v1/keys/bench/release"

    def attempt(conn: _Connection, index: int, n: int) -> tuple[int, str, int, bytes] | None:
        status, challenge = conn.post("/v1/challenge", b"")
        if status != 200:
            raise RuntimeError(f"challenge answered {status}: {challenge}")
        nonce = base64.b64decode(challenge["nonce"])
        slot = n % KEY_POOL
        public = pools[index][slot][1]
        if provider is None:
            evidence = quote
        else:
            evidence = provider.collect(hashlib.sha256(nonce + public).digest() + bytes(32)).to_bytes()
        body = (
            f'{{"nonce":"{challenge["nonce"]}","evidence":"{base64.b64encode(evidence).decode()}",'
            f'"public_key":"{base64.b64encode(public).decode()}","kem":"{kem}"}}'
        ).encode()
        status, answer = conn.post(path, body)
        if provider is None:
            if status == 403 and answer.get("rule") == "binding":
                return None
            raise RuntimeError(f"replayed quote answered {status} {answer.get('error')} {answer.get('rule')}")
        if status != 200:
            raise RuntimeError(f"release answered {status}: {answer.get('error')} {answer.get('rule')}")
        return slot, answer["key_id"], answer["version"], base64.b64decode(answer["ciphertext"])

    def loop(index: int) -> None:
        conn = _Connection(spec["port"], context)
        try:
            for n in range(3):  # TLS handshake and first-use costs outside the window
                attempt(conn, index, n)
            time.sleep(max(0.0, start - time.time()))
            n = 0
            while (began := time.time()) < end:
                n += 1
                try:
                    got = attempt(conn, index, n)
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    errors[index].append(f"{type(exc).__name__}: {exc}"[:200])
                    conn.close()
                    conn = _Connection(spec["port"], context)
                    continue
                finished = time.time()
                if finished < end:
                    latencies[index].append(finished - began)
                    if got is not None:
                        opened[index].append(got)
        finally:
            conn.close()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start - time.time()))
    cpu_before = time.process_time()
    time.sleep(max(0.0, end - time.time()))
    cpu = time.process_time() - cpu_before
    for worker in workers:
        worker.join()
    # Every released key is checked, after the window: it must be the broker's 32-byte KEK.
    checked, keks = 0, set()
    if provider is not None:
        from cryptography.hazmat.primitives import hpke

        from enclaveml.kms._release import release_info

        suite = hpke.Suite(
            hpke.KEM.MLKEM768_X25519 if kem == HYBRID else hpke.KEM.X25519,
            hpke.KDF.HKDF_SHA256,
            hpke.AEAD.AES_256_GCM,
        )
        for index, released in enumerate(opened):
            for slot, key_id, version, ciphertext in released:
                kek = suite.decrypt(ciphertext, pools[index][slot][0], info=release_info(key_id, version))
                if len(kek) != 32:
                    raise RuntimeError("a release decrypted to something other than a 32-byte key")
                keks.add(kek)
                checked += 1
    flat = [x for lat in latencies for x in lat]
    return {
        "count": len(flat),
        "errors": [e for errs in errors for e in errs],
        "latencies": flat,
        "cpu": cpu,
        "decrypted": checked,
        "distinct_keys": len(keks),
    }


def measure_https(
    mode: str, kem: str, processes: int, threads: int, seconds: float, db_fs: str, workers: int
) -> dict[str, Any]:
    parent = "/dev/shm" if db_fs == "tmpfs" else None
    with tempfile.TemporaryDirectory(prefix="enclaveml-bench-kbs-", dir=parent) as tmp:
        spec = _prepare(Path(tmp), mode, workers)
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.key_release", "--serve", json.dumps(spec)],
            cwd=Path(__file__).parent.parent,
            start_new_session=True,  # its own process group: the CPU of every worker is counted
        )
        try:
            _wait_until_listening(spec["port"], server)
            time.sleep(0.5 * workers)  # every worker process up
            start = time.time() + 3.0 + 0.5 * processes  # client start and warm-up before the window
            jobs = [(spec, threads, start, seconds, kem)] * processes
            # fork: the workers inherit the simulated measurement computed for the policy, even
            # if package files change meanwhile (other work in a shared checkout).
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                pending = pool.map_async(_client_process, jobs)
                time.sleep(max(0.0, start - time.time()))
                server_cpu, busy, load = (
                    _process_group_cpu(server.pid),
                    _machine_busy_seconds(),
                    os.getloadavg(),
                )
                time.sleep(seconds)
                server_cpu = _process_group_cpu(server.pid) - server_cpu
                busy = _machine_busy_seconds() - busy
                results = pending.get(timeout=seconds + 300)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    latencies = sorted(x for r in results for x in r["latencies"])
    count = len(latencies)
    client_cpu = sum(r["cpu"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    out: dict[str, Any] = {
        "clients": f"{processes} processes x {threads} threads, keep-alive TLS",
        "broker_processes": workers,
        "db_filesystem": db_fs,
        "releases_per_s": count / seconds,
        "goal_ratio": count / seconds / GOAL,
        "errors": len(errors),
        "latency_ms_p50": 1000 * statistics.median(latencies) if latencies else None,
        "latency_ms_p99": 1000 * latencies[int(0.99 * (count - 1))] if latencies else None,
        # Per-release CPU: what one broker core can serve, whatever the clients cost here.
        "broker_cpu_ms_per_release": 1000 * server_cpu / count if count else None,
        "broker_capacity_per_core_per_s": count / server_cpu if server_cpu else None,
        "client_cpu_ms_per_release": 1000 * client_cpu / count if count else None,
        "broker_cpu_cores": server_cpu / seconds,
        "client_cpu_cores": client_cpu / seconds,
        # Everything else running on the machine meanwhile (other users, this script's parent).
        "other_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / seconds,
        "load_average_at_start": load[0],
    }
    if mode == "simulation":
        out["keys_decrypted"] = sum(r["decrypted"] for r in results)
        if out["keys_decrypted"] != count or any(r["distinct_keys"] != 1 for r in results if r["decrypted"]):
            raise RuntimeError("released keys did not all decrypt to the same KEK")
    if errors:
        out["first_errors"] = errors[:3]
    return out


# -- in-process -----------------------------------------------------------------------------------


def measure_broker_in_process(seconds: float, kem: str) -> dict[str, Any]:
    """Broker CPU per release without HTTP: challenge + release on the service, database on disk."""
    from enclaveml.attestation.simulation import SimulationProvider
    from enclaveml.kms._release import expected_report_data
    from enclaveml.kms._rootkey import RootKey
    from enclaveml.kms._service import KeyBroker
    from enclaveml.kms._storage import SqliteKeyStore

    with tempfile.TemporaryDirectory(prefix="enclaveml-bench-kbs-") as tmp:
        sim_key = Path(tmp) / "sim.pem"
        provider = SimulationProvider(key_path=sim_key, **WORKLOAD)  # type: ignore[arg-type]
        store = SqliteKeyStore(Path(tmp) / "kbs.db")
        try:
            broker = KeyBroker(store, RootKey.generate(), _verifier("simulation", sim_key))
            broker.create_key("bench", _policy("simulation"))
            public = _key_pair(kem)[1]
            cpu = wall = 0.0
            count = 0
            while wall < seconds or count < 50:
                nonce = broker.challenge().nonce  # timed below together with the release
                evidence = provider.collect(expected_report_data(nonce, public)).to_bytes()
                began, began_cpu = time.perf_counter(), time.process_time()
                broker.release("bench", nonce, evidence, public, kem)
                cpu += time.process_time() - began_cpu
                wall += time.perf_counter() - began
                count += 1
            began, began_cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                broker.challenge()
            challenge_cpu = time.process_time() - began_cpu
            challenge_wall = time.perf_counter() - began
        finally:
            store.close()
    return {
        "db_filesystem": "disk",
        "kem": kem,
        "release_cpu_ms": 1000 * cpu / count,
        "release_wall_ms": 1000 * wall / count,
        "challenge_cpu_ms": 1000 * challenge_cpu / count,
        "challenge_wall_ms": 1000 * challenge_wall / count,
    }


def measure_dcap_in_process(seconds: float) -> dict[str, Any]:
    from enclaveml.attestation import (
        DcapVerifier,
        Evidence,
        EvidenceVerifier,
        LocalCollateral,
        appraise_evidence,
    )
    from enclaveml.errors import BindingError, KeyReleaseDeniedError
    from enclaveml.kms._release import expected_report_data
    from enclaveml.kms._rootkey import RootKey
    from enclaveml.kms._service import KeyBroker
    from enclaveml.kms._storage import SqliteKeyStore

    quote = QUOTE.read_bytes()
    dcap = DcapVerifier(LocalCollateral(COLLATERAL))
    policy = _policy("dcap")
    claims = dcap.verify(Evidence.from_bytes(quote), now=PINNED_NOW)
    public_key = os.urandom(32)
    bound_to = expected_report_data(os.urandom(32), public_key)

    def verify_and_bind() -> None:
        try:
            appraise_evidence(
                Evidence.from_bytes(quote),
                verifier=dcap,
                policy=policy,
                expected_report_data=bound_to,
                now=PINNED_NOW,
            )
        except BindingError:
            return
        raise RuntimeError("binding check passed unexpectedly")

    with tempfile.TemporaryDirectory(prefix="enclaveml-bench-kbs-") as tmp:
        store = SqliteKeyStore(Path(tmp) / "kbs.db")
        broker = KeyBroker(
            store, RootKey.generate(), EvidenceVerifier(dcap=dcap), clock=lambda: float(PINNED_NOW)
        )
        broker.create_key("bench", policy)

        def release_attempt() -> None:
            nonce = broker.challenge().nonce
            try:
                broker.release("bench", nonce, quote, public_key, "X25519")
            except KeyReleaseDeniedError as exc:
                if exc.rule == "binding":
                    return
                raise

        try:
            results: dict[str, Any] = {
                "db_filesystem": "disk",
                "verify_per_s": rate(
                    lambda: dcap.verify(Evidence.from_bytes(quote), now=PINNED_NOW), min_seconds=seconds
                ),
                "verify_and_binding_check_per_s": rate(verify_and_bind, min_seconds=seconds),
                "policy_check_per_s": rate(lambda: policy.check(claims), min_seconds=seconds / 2),
                "broker_challenge_and_release_denied_at_binding_per_s": rate(
                    release_attempt, min_seconds=seconds
                ),
            }
        finally:
            store.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per HTTPS case")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=8, help="client threads (connections) per process")
    parser.add_argument("--quick", action="store_true", help="one simulation case and the DCAP cases")
    parser.add_argument("--only", help="run only the HTTPS cases whose name contains this text")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    load_before = os.getloadavg()
    https = [  # (mode, kem, filesystem, broker processes)
        ("simulation", HYBRID, "disk", 1),
        ("simulation", X25519, "disk", 1),
        ("simulation", HYBRID, "tmpfs", 1),
        ("simulation", HYBRID, "disk", 2),
        ("dcap", X25519, "disk", 1),
    ]
    if args.quick:
        https = [https[0], https[-1]]
    cases: dict[str, Any] = {}
    clients = (args.processes, args.threads, args.seconds)
    for mode, kem, fs, workers in https:
        name = (
            f"simulation/{kem}/{fs}/{workers}w"
            if mode == "simulation"
            else f"dcap/https-denied-at-binding/{fs}/{workers}w"
        )
        if args.only and args.only not in name:
            continue
        cases[name] = measure_https(mode, kem, *clients, fs, workers)
        print(f"{name}: " + ", ".join(_show(k, v) for k, v in cases[name].items()), flush=True)
    if not args.only:
        cases["broker/in-process"] = measure_broker_in_process(args.seconds / 2, HYBRID)
        cases["dcap/in-process"] = measure_dcap_in_process(args.seconds / 2)
        for name in ("broker/in-process", "dcap/in-process"):
            print(f"{name}: " + ", ".join(_show(k, v) for k, v in cases[name].items()), flush=True)
    simulated = [r["releases_per_s"] for name, r in cases.items() if name.startswith("simulation/")]
    best = max(simulated, default=0.0)
    path = write_results(
        "key_release",
        {
            "goal_releases_per_s": GOAL,
            "best_simulation_releases_per_s": best,
            "goal_ratio": best / GOAL,
            "load_average_before": load_before,
            "cases": cases,
        },
    )
    print(f"best simulation: {best:.1f} releases/s = {best / GOAL:.2f} x the goal of {GOAL:.0f}/s")
    print(f"results: {path}")
    return 0 if best >= GOAL else 1


def _show(key: str, value: Any) -> str:
    return f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"


if __name__ == "__main__":
    sys.exit(main())
