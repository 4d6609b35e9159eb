"""Evidence from Intel TDX and AMD SEV-SNP guests through Linux configfs-tsm.

This module owns enclaveml's use of the kernel ABI documented in
``Documentation/ABI/testing/configfs-tsm-report`` (Linux 6.7+). One report is one directory
under ``/sys/kernel/config/tsm/report``::

    mkdir  $root/$name                 the kernel populates the entry with its attributes
    $name/provider         (read)      "tdx_guest" -> TDX quote, "sev_guest" -> SEV-SNP report
    $name/generation       (read)      counts every write to inblob or an option
    $name/privlevel        (write)     optional, SEV-SNP VMPL; between privlevel_floor and 3
    $name/inblob           (write)     the 64 bytes of report data
    $name/outblob          (read)      the signed quote / report, generated on first read
    $name/auxblob          (read)      SEV-SNP only, optional: the host's certificate table
    rmdir  $root/$name                 frees the kernel state

Entries are shared kernel objects: anyone who can see the directory can write to it between
our ``inblob`` write and our ``outblob`` read, and the outblob would then bind *their* data.
The ABI's answer is the ``generation`` counter, so every attempt reads it before writing and
after reading, requires it to start at the kernel's 0 (a write between our mkdir and our first
read, such as a foreign ``privlevel``, would otherwise be counted as the starting value) and to
have advanced by exactly our own writes, and otherwise throws the report away and tries again in
a fresh entry. Each entry gets a random name, and is
removed in a ``finally`` so failed attempts do not leak kernel memory.

All file system access goes through :class:`_ConfigfsTree`, the seam that lets tests stand
in for the kernel (populate an entry on mkdir, produce an outblob on write) on a real
temporary tree.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

from enclaveml.attestation.evidence import Evidence, TeeType, check_report_data
from enclaveml.errors import ConfigurationError, EvidenceError, TEENotAvailableError

__all__ = ["DEFAULT_TSM_ROOT", "TsmProvider"]

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")

_log = logging.getLogger(__name__)

_PROVIDERS = {"tdx_guest": TeeType.TDX, "sev_guest": TeeType.SEV_SNP}
_PRIVLEVEL_MAX = 3  # TSM_PRIVLEVEL_MAX in include/linux/tsm.h
_READ_CHUNK = 64 * 1024
# TSM_OUTBLOB_MAX is 32 KiB; the SEV-SNP certificate table is a few KiB. Bound reads so a
# misbehaving file cannot exhaust memory.
_MAX_FILE_SIZE = 1024 * 1024
_SETUP_HINT = (
    "mount configfs (mount -t configfs none /sys/kernel/config) and load the guest driver "
    "(tdx_guest or sev_guest) inside a TDX or SEV-SNP guest"
)


class _ConfigfsTree:
    """The file operations the provider performs, on real paths; tests subclass it to play the kernel.

    Every method raises ``OSError`` as the OS does; translating it is the provider's job.
    """

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            total = 0
            while chunk := os.read(fd, _READ_CHUNK):
                total += len(chunk)
                if total > _MAX_FILE_SIZE:
                    raise OSError(errno.EFBIG, f"larger than {_MAX_FILE_SIZE} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> int:
        """Write ``data`` in one ``os.write`` call and return the count the kernel accepted.

        No ``O_CREAT``: configfs creates attributes itself, so a missing one must fail.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.write(fd, data)
        finally:
            # configfs hands binary attributes (inblob) to the driver on close, so errors
            # from the driver surface here and must propagate.
            os.close(fd)


class TsmProvider:
    """Collects TDX quotes or SEV-SNP reports through configfs-tsm.

    ``max_attempts`` bounds the retries after a detected concurrent write; ``privlevel``
    (SEV-SNP VMPL, 0-3) is written before ``inblob`` when given; ``expected_tee``, when
    given, makes collection fail unless the kernel's provider produces that kind of TEE
    (so ``--tee tdx`` on an SEV-SNP guest is an error rather than a surprise).

    Construction fails with :class:`TEENotAvailableError` when ``root`` is not a directory.
    The TEE type is only known after asking the kernel, so :attr:`tee` creates (and removes)
    a probe entry on first use and caches the answer.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_TSM_ROOT,
        *,
        max_attempts: int = 3,
        privlevel: int | None = None,
        expected_tee: TeeType | None = None,
        _tree: _ConfigfsTree | None = None,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        if privlevel is not None and (
            isinstance(privlevel, bool)
            or not isinstance(privlevel, int)
            or not 0 <= privlevel <= _PRIVLEVEL_MAX
        ):
            raise ConfigurationError(
                f"privlevel must be an integer from 0 to {_PRIVLEVEL_MAX}, got {privlevel!r}"
            )
        if expected_tee not in (None, TeeType.TDX, TeeType.SEV_SNP):
            raise ConfigurationError(f"configfs-tsm provides TDX or SEV-SNP evidence, not {expected_tee}")
        self._root = Path(root)
        self._max_attempts = max_attempts
        self._privlevel = privlevel
        self._expected_tee = expected_tee
        self._tree = _tree if _tree is not None else _ConfigfsTree()
        self._tee: TeeType | None = None
        self._require_root()

    def __repr__(self) -> str:
        return f"TsmProvider(root={str(self._root)!r}, max_attempts={self._max_attempts})"

    @property
    def root(self) -> Path:
        """The configfs-tsm report directory this provider creates entries in."""
        return self._root

    @property
    def tee(self) -> TeeType:
        """TDX or SEV-SNP, as named by the kernel's ``provider`` attribute (probed once, cached).

        The first access creates and removes a probe entry, and may raise EvidenceError.
        Note that on Python 3.11 ``isinstance(p, EvidenceProvider)`` evaluates this property.
        """
        if self._tee is None:
            entry = self._make_entry()
            try:
                self._tee = self._read_provider(entry)
            finally:
                self._remove_entry(entry)
        return self._tee

    def collect(self, report_data: bytes) -> Evidence:
        """Return a TDX quote or SEV-SNP report whose report data is exactly ``report_data``."""
        data = check_report_data(report_data)
        self._require_root()
        for attempt in range(1, self._max_attempts + 1):
            evidence = self._attempt(data)
            if evidence is not None:
                return evidence
            _log.warning(
                "configfs-tsm generation changed during attempt %d of %d: another writer touched "
                "the report entry; discarding the report and retrying",
                attempt,
                self._max_attempts,
            )
        raise EvidenceError(
            f"configfs-tsm report under {self._root} was modified by another writer in all "
            f"{self._max_attempts} attempts, so no report provably binds the requested data; find "
            "the process writing to enclaveml's entries, or raise max_attempts"
        )

    def _attempt(self, data: bytes) -> Evidence | None:
        """One report in a fresh entry; None when ``generation`` shows a concurrent writer."""
        entry = self._make_entry()
        try:
            tee = self._read_provider(entry)
            before = self._read_generation(entry)
            if before != 0:
                # The kernel creates every entry at generation 0: another writer got here between
                # mkdir and this read, and may have set an option we do not write (privlevel, an
                # SVSM service) that our own writes would not undo.
                return None
            writes = 0
            if self._privlevel is not None:
                self._write_exact(
                    entry / "privlevel",
                    f"{self._privlevel}\n".encode("ascii"),
                    hint=f"privlevel must be at least privlevel_floor and at most {_PRIVLEVEL_MAX}, "
                    "and only SEV-SNP guests accept it",
                )
                writes += 1
            self._write_exact(entry / "inblob", data)
            writes += 1
            outblob = self._read(entry / "outblob")
            aux = self._read_optional(entry / "auxblob") if tee is TeeType.SEV_SNP else b""
            after = self._read_generation(entry)
            # Each of our writes bumps generation once; any other value means someone else
            # wrote in between and outblob may bind their inblob or options, not ours.
            if after != before + writes:
                return None
            if not outblob:
                raise EvidenceError(
                    f"{entry / 'outblob'} is empty: the {tee} guest driver produced no report"
                )
            return Evidence(tee, outblob, aux)
        finally:
            self._remove_entry(entry)

    def _require_root(self) -> None:
        if not self._root.is_dir():
            raise TEENotAvailableError(
                f"configfs-tsm report directory {self._root} not found: this is not a TDX or SEV-SNP "
                f"guest with configfs-tsm (Linux 6.7+), or it is not set up; {_SETUP_HINT}"
            )

    def _make_entry(self) -> Path:
        # A random name per report: entries are never shared, even between our own threads.
        entry = self._root / f"enclaveml-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self._tree.mkdir(entry)
        except FileNotFoundError as exc:
            raise TEENotAvailableError(f"configfs-tsm report directory {self._root} disappeared") from exc
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENODEV):
                raise TEENotAvailableError(
                    f"could not create report entry {entry}: {_reason(exc)}; no TSM provider driver "
                    f"is registered; {_SETUP_HINT}"
                ) from exc
            raise EvidenceError(
                f"could not create report entry {entry}: {_reason(exc)} (creating configfs-tsm "
                "reports usually requires root)"
            ) from exc
        return entry

    def _remove_entry(self, entry: Path) -> None:
        try:
            self._tree.rmdir(entry)
        except OSError as exc:
            # Never raised: this runs in a finally and must not mask the error being reported,
            # and a leaked entry does not weaken evidence already collected.
            _log.warning("could not remove configfs-tsm report entry %s: %s", entry, _reason(exc))

    def _read_provider(self, entry: Path) -> TeeType:
        path = entry / "provider"
        name = self._read(path).strip(b"\x00 \t\r\n").decode("ascii", errors="replace")
        tee = _PROVIDERS.get(name)
        if tee is None:
            raise EvidenceError(
                f"{path} names provider {name[:64]!r}; enclaveml supports {', '.join(sorted(_PROVIDERS))}"
            )
        if self._expected_tee is not None and tee is not self._expected_tee:
            raise EvidenceError(
                f"{self._expected_tee} evidence was requested, but {path} is {name!r} ({tee}); "
                "choose the TEE this guest actually runs in"
            )
        if self._tee is not None and tee is not self._tee:
            raise EvidenceError(f"{path} changed from {self._tee} to {tee} while this process was running")
        self._tee = tee
        return tee

    def _read_generation(self, entry: Path) -> int:
        path = entry / "generation"
        raw = self._read(path)
        try:
            return int(raw.strip(b"\x00 \t\r\n"))
        except ValueError as exc:
            raise EvidenceError(f"{path} does not hold a decimal counter: {raw[:32]!r}") from exc

    def _write_exact(self, path: Path, data: bytes, *, hint: str = "") -> None:
        try:
            written = self._tree.write(path, data)
        except OSError as exc:
            suffix = f"; {hint}" if hint else ""
            raise EvidenceError(f"could not write {path}: {_reason(exc)}{suffix}") from exc
        if written != len(data):
            raise EvidenceError(
                f"short write to {path}: {written} of {len(data)} bytes were accepted, so the report "
                "would not bind the requested data"
            )

    def _read(self, path: Path) -> bytes:
        try:
            return self._tree.read(path)
        except OSError as exc:
            raise EvidenceError(f"could not read {path}: {_reason(exc)}") from exc

    def _read_optional(self, path: Path) -> bytes:
        """Read an attribute older kernels may not have; absent means empty, unreadable is an error."""
        try:
            return self._tree.read(path)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise EvidenceError(f"could not read {path}: {_reason(exc)}") from exc


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
