"""`enclaveml demo`: a simulated workload attests end to end on embedded defaults.

Collect → verify → appraise → RA-TLS handshake, on this machine, with the simulation TEE
(there is no TEE hardware to assume). It also shows the two ways the trust core says no:
the default policy refusing simulated evidence, and a policy with another measurement.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.table import Table

from enclaveml.attestation.appraisal import appraise_evidence
from enclaveml.attestation.policy import (
    AllOf,
    DebugMode,
    MeasurementAllowlist,
    UnsafeAllowSimulation,
    default_policy,
)
from enclaveml.attestation.ratls import RatlsCertificate, create_ratls_certificate
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.attestation.tls import attest_server, server_ssl_context
from enclaveml.cli._console import claims_table, console, simulation_banner
from enclaveml.errors import PolicyRejectedError

_GREETING = b"hello from inside the (simulated) TEE"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(_GREETING)))
        self.end_headers()
        self.wfile.write(_GREETING)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _ratls_server(ratls: RatlsCertificate) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = server_ssl_context(ratls).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="demo-ratls-server", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_demo() -> None:
    """Run the demo and print each step; raises if any step does not behave as it must."""
    simulation_banner(console)
    started = time.perf_counter()
    # The key lives only in memory: the demo leaves nothing behind.
    key = SimulationKey.generate()
    workload = SimulationProvider(key=key, entry_point="enclaveml demo", config={"demo": "attestation"})
    verifier = SimulationVerifier(key.public_key())
    policy = UnsafeAllowSimulation(
        AllOf(MeasurementAllowlist([workload.measurement]), DebugMode(allow=False))
    )

    console.rule("1. collect: the workload binds a nonce into evidence")
    nonce = bytes(range(64))
    evidence = workload.collect(nonce)
    console.print(
        f"evidence: {evidence.tee.value}, {len(evidence.data)} bytes, "
        f"measurement {workload.measurement.hex()}"
    )

    console.rule("2. verify + appraise: signature, nonce binding, policy")
    claims = appraise_evidence(evidence, verifier=verifier, policy=policy, expected_report_data=nonce)
    console.print(claims_table(claims.to_dict()))
    console.print("[green]verdict: ACCEPTED[/green] by the explicitly unsafe development policy")
    try:
        appraise_evidence(evidence, verifier=verifier, policy=default_policy(), expected_report_data=nonce)
    except PolicyRejectedError as exc:
        console.print(f"[yellow]default policy: REJECTED[/yellow] by rule '{exc.rule}' (as it must be)")
    else:  # pragma: no cover - would be a security bug
        raise RuntimeError("the default policy accepted simulated evidence")

    console.rule("3. RA-TLS: certificate key bound into fresh evidence, verified over a real TLS socket")
    ratls = create_ratls_certificate(workload, nonce=b"demo-session")
    with _ratls_server(ratls) as url:
        attested = attest_server(url, verifier=verifier, policy=policy)
        with attested.client() as client:
            reply = client.get("/").content
        table = Table(show_header=False)
        table.add_row("server", url)
        table.add_row("certificate SHA-256", attested.peer.fingerprint)
        table.add_row("bound nonce", (attested.peer.nonce or b"").decode())
        table.add_row("reply over the pinned channel", reply.decode())
        console.print(table)
        try:
            attest_server(
                url, verifier=verifier, policy=UnsafeAllowSimulation(MeasurementAllowlist([b"\x00" * 48]))
            )
        except PolicyRejectedError as exc:
            console.print(f"[yellow]client with another expected measurement: REFUSED[/yellow] ({exc.rule})")
        else:  # pragma: no cover - would be a security bug
            raise RuntimeError("a client with the wrong measurement accepted the server")
    console.rule("done")
    console.print(
        f"verdict: [bold green]ACCEPTED[/bold green] (simulated) in {time.perf_counter() - started:.2f} s. "
        "Secrets: the simulation key and the TLS private key lived only in this process's memory."
    )
