"""Evidence from Intel SGX enclaves run by Gramine, through its ``/dev/attestation`` pseudo-files.

This module owns the one conversation enclaveml has with Gramine's attestation interface::

    /dev/attestation/attestation_type   (read)  "none", "epid" or "dcap", from the manifest
    /dev/attestation/user_report_data   (write) exactly 64 bytes, placed in the REPORT's report data
    /dev/attestation/quote              (read)  a DCAP quote over the enclave REPORT

Gramine commits ``user_report_data`` when the file is closed and only accepts the full 64 bytes,
so the data is written in one ``write`` call whose count is checked: a short write would leave
an unknown mix of old and new report data in the quote. Only DCAP is accepted; EPID depends on
Intel's retired attestation service and ``none`` means the manifest disabled remote attestation.

The provider never parses the quote: binding and signatures are the verifier's job.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from enclaveml.attestation.evidence import REPORT_DATA_SIZE, Evidence, TeeType, check_report_data
from enclaveml.errors import EvidenceError, TEENotAvailableError

__all__ = ["DEFAULT_GRAMINE_ROOT", "GramineProvider"]

DEFAULT_GRAMINE_ROOT = Path("/dev/attestation")

_MANIFEST_FIX = 'set sgx.remote_attestation = "dcap" in the Gramine manifest, then re-sign the enclave'
_READ_CHUNK = 64 * 1024
# Gramine quotes are a few KiB; anything far larger is not a quote and must not exhaust memory.
_MAX_FILE_SIZE = 1024 * 1024


class GramineProvider:
    """Collects DCAP quotes inside a Gramine SGX enclave.

    ``root`` is the directory Gramine mounts its attestation pseudo-files on; it is only
    configurable so tests can point it at a temporary tree. Construction fails with
    :class:`TEENotAvailableError` when ``root`` is not a directory, so a provider asked for
    by name on the wrong machine fails at start-up rather than at the first request.
    """

    def __init__(self, root: str | Path = DEFAULT_GRAMINE_ROOT) -> None:
        self._root = Path(root)
        self._require_root()

    def __repr__(self) -> str:
        return f"GramineProvider(root={str(self._root)!r})"

    @property
    def root(self) -> Path:
        """The attestation pseudo-file directory this provider talks to."""
        return self._root

    @property
    def tee(self) -> TeeType:
        """Always SGX: Gramine's attestation interface exists only inside SGX enclaves."""
        return TeeType.SGX

    def collect(self, report_data: bytes) -> Evidence:
        """Return a DCAP quote whose report data is exactly ``report_data`` (64 bytes)."""
        data = check_report_data(report_data)
        self._require_root()
        self._check_attestation_type()
        # user_report_data is one per enclave: without the lock, concurrent callers (the servers
        # answer /attestation from a thread pool) get quotes over each other's report data.
        with _collect_lock(self._root):
            self._write_report_data(data)
            quote = self._read(self._root / "quote")
        if not quote:
            raise EvidenceError(
                f"{self._root / 'quote'} returned an empty quote; check that the enclave can reach "
                "the SGX quoting enclave (aesmd / the DCAP quote provider library) on the host"
            )
        return Evidence(TeeType.SGX, quote)

    def _require_root(self) -> None:
        if not self._root.is_dir():
            raise TEENotAvailableError(
                f"Gramine attestation interface {self._root} not found: this process is not running "
                "inside a Gramine SGX enclave"
            )

    def _check_attestation_type(self) -> None:
        path = self._root / "attestation_type"
        raw = self._read(path)
        # Gramine returns the bare word; tolerate a trailing newline or NUL from other versions.
        kind = raw.strip(b"\x00 \t\r\n").decode("ascii", errors="replace")
        if kind == "dcap":
            return
        if kind == "none":
            raise EvidenceError(
                f"{path} is 'none': remote attestation is disabled for this enclave; {_MANIFEST_FIX}"
            )
        if kind == "epid":
            raise EvidenceError(
                f"{path} is 'epid': EPID attestation is not supported (Intel has retired its "
                f"attestation service); {_MANIFEST_FIX} and remove sgx.ra_client_spid"
            )
        raise EvidenceError(f"{path} is {kind[:64]!r}, but enclaveml requires 'dcap'; {_MANIFEST_FIX}")

    def _write_report_data(self, data: bytes) -> None:
        path = self._root / "user_report_data"
        try:
            written = _write_once(path, data)
        except OSError as exc:
            raise EvidenceError(f"could not write report data to {path}: {_reason(exc)}") from exc
        if written != REPORT_DATA_SIZE:
            raise EvidenceError(
                f"short write to {path}: {written} of {REPORT_DATA_SIZE} bytes were accepted, so the "
                "quote would not bind the requested report data"
            )

    def _read(self, path: Path) -> bytes:
        try:
            return _read_all(path)
        except OSError as exc:
            raise EvidenceError(f"could not read {path}: {_reason(exc)}") from exc


def _write_once(path: Path, data: bytes) -> int:
    """Write ``data`` with a single ``write`` call and return the count the OS accepted.

    No ``O_CREAT``: a missing pseudo-file means the interface is not what we expect, and
    creating a regular file there would hide that.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return os.write(fd, data)
    finally:
        # Gramine commits the report data on close, so a failure here is a failed write.
        os.close(fd)


def _read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, _READ_CHUNK):
            total += len(chunk)
            if total > _MAX_FILE_SIZE:
                raise EvidenceError(f"{path} is larger than {_MAX_FILE_SIZE} bytes; refusing to read it")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _collect_lock(root: Path) -> threading.Lock:
    """One lock per attestation directory, shared by every provider on it in this process."""
    key = root.resolve()
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())
