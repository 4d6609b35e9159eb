"""Test helpers for the real Intel DCAP vectors in ``tests/vectors/data`` (see its README).

Loads the cases of ``expected.json``, maps each quote's signed regions independently of the
code under test (so tamper tests know exactly which bytes a signature covers), and runs a
local HTTP server that serves the real Intel-PCS-format files of the automata TDX case.
"""

from __future__ import annotations

import functools
import json
import struct
import threading
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from enclaveml.attestation._collateral import LocalCollateral
from enclaveml.attestation._dcap import DcapVerifier

DATA = Path(__file__).parent / "data"
EXPECTED: dict[str, dict[str, Any]] = json.loads((DATA / "expected.json").read_text())["cases"]
DCAP_CASES = sorted(name for name in EXPECTED if not name.startswith("sev-snp/"))
VERIFIED_CASES = [name for name in DCAP_CASES if EXPECTED[name]["expected"]["result"] == "verified"]
REJECTED_CASES = [name for name in DCAP_CASES if EXPECTED[name]["expected"]["result"] == "rejected"]
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
PEM_END = b"-----END CERTIFICATE-----"


def unix(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def case_dir(name: str) -> Path:
    return DATA / name.split("/")[0]


def quote_file_bytes(name: str) -> bytes:
    """The quote file as stored: binary, or hex text for ``*.hex``."""
    return (case_dir(name) / str(EXPECTED[name]["quote"])).read_bytes()


@functools.cache
def quote_bytes(name: str) -> bytes:
    """The raw quote (hex files decoded), including any trailing padding."""
    blob = quote_file_bytes(name)
    return bytes.fromhex(blob.decode()) if EXPECTED[name]["quote"].endswith(".hex") else blob


def collateral_path(name: str) -> Path:
    return case_dir(name) / str(EXPECTED[name]["collateral"])


@functools.cache
def verifier_for(name: str) -> DcapVerifier:
    """A verifier over this case's single collateral file (cached: loading parses CRLs)."""
    return DcapVerifier(LocalCollateral(collateral_path(name)))


def now_for(name: str) -> int:
    return int(EXPECTED[name]["recommended_now_unix"])


@dataclass(frozen=True)
class Regions:
    """Byte ranges of one quote; every range here is covered by a signature."""

    header: range
    body: range
    signature: range
    attestation_key: range
    qe_report: range
    qe_report_signature: range
    pck_leaf: range
    signed_length: int

    def tamper_evident(self) -> list[int]:
        """Every offset that must be rejected when flipped (leaf PEM newlines excluded)."""
        ranges = (self.header, self.body, self.signature, self.attestation_key)
        return [i for r in (*ranges, self.qe_report, self.qe_report_signature) for i in r]


def regions(quote: bytes) -> Regions:
    """Walk the quote layout (Intel DCAP quote v3/v4/v5 with ECDSA-P256 and PEM certification data)."""
    version = struct.unpack_from("<H", quote, 0)[0]
    if version == 5:
        body = range(54, 54 + struct.unpack_from("<I", quote, 50)[0])
    else:
        body = range(48, 48 + {3: 384, 4: 584}[version])
    sig_len = struct.unpack_from("<I", quote, body.stop)[0]
    pos = body.stop + 4
    signature = range(pos, pos + 64)
    key = range(signature.stop, signature.stop + 64)
    pos = key.stop
    if version >= 4:
        cert_type, _size = struct.unpack_from("<HI", quote, pos)
        assert cert_type == 6, "v4/v5 quotes wrap the QE report in certification data type 6"
        pos += 6
    qe_report = range(pos, pos + 384)
    qe_sig = range(qe_report.stop, qe_report.stop + 64)
    auth_len = struct.unpack_from("<H", quote, qe_sig.stop)[0]
    pos = qe_sig.stop + 2 + auth_len
    cert_type, size = struct.unpack_from("<HI", quote, pos)
    assert cert_type == 5, "PCK certificate chain expected as certification data type 5"
    pem_start = pos + 6
    leaf_end = quote.index(PEM_END, pem_start) + len(PEM_END)
    assert quote[pem_start : pem_start + len(PEM_BEGIN)] == PEM_BEGIN
    signed = body.stop + 4 + sig_len
    assert pem_start + size == signed, "the PEM chain ends the signed quote"
    return Regions(range(0, 48), body, signature, key, qe_report, qe_sig, range(pem_start, leaf_end), signed)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# -- a local stand-in for Intel PCS / PCCS ---------------------------------------------------

PCS_DIR = DATA / "tdx" / "automata_tdx_v4.pcs"
AUTOMATA = "tdx/automata_tdx_v4"


@dataclass
class Route:
    """One canned answer; ``query`` must match the request's query exactly or the server says 404."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)


def pcs_routes() -> dict[str, Route]:
    """The automata TDX collateral, served the way Intel PCS serves it (PEM chains in headers)."""
    tcb_chain = quote((PCS_DIR / "tcb_info_issuer_chain.pem").read_text(), safe="")
    crl_chain = quote((PCS_DIR / "pck_crl_issuer_chain.pem").read_text(), safe="")
    return {
        "/tdx/certification/v4/tcb": Route(
            (PCS_DIR / "tcb_info.pcs.json").read_bytes(),
            {"TCB-Info-Issuer-Chain": tcb_chain, "Content-Type": "application/json"},
            query={"fmspc": "00806F050000"},
        ),
        "/tdx/certification/v4/qe/identity": Route(
            (PCS_DIR / "qe_identity.pcs.json").read_bytes(),
            {"SGX-Enclave-Identity-Issuer-Chain": tcb_chain, "Content-Type": "application/json"},
        ),
        "/sgx/certification/v4/pckcrl": Route(
            (PCS_DIR / "pck_platform_crl.der").read_bytes(),
            {"SGX-PCK-CRL-Issuer-Chain": crl_chain, "Content-Type": "application/pkix-crl"},
            query={"ca": "platform", "encoding": "der"},
        ),
        "/sgx/certification/v4/rootcacrl": Route((PCS_DIR / "root_ca_crl.der").read_bytes()),
    }


class FakePcs:
    """A real HTTP server on 127.0.0.1 (ephemeral port) in a thread, answering from ``routes``."""

    def __init__(self) -> None:
        self.routes = pcs_routes()
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path?query, headers)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers.items())))
                url = urlsplit(self.path)
                route = owner.routes.get(url.path)
                if route is None or dict(parse_qsl(url.query)) != route.query:
                    route = Route(b'{"error":"not found"}', status=404)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()
