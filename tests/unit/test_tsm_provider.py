"""TsmProvider against a real temporary configfs-like tree, with the kernel's side effects emulated.

A plain directory cannot behave like configfs (mkdir does not populate the entry, writing
inblob produces no outblob), so :class:`KernelEmulator` subclasses the provider's file seam
and plays the kernel on the real tree, recording every mkdir, rmdir and write call.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from enclaveml.attestation._tsm import _ConfigfsTree
from enclaveml.attestation.evidence import EvidenceProvider, TeeType
from enclaveml.attestation.providers import TsmProvider
from enclaveml.errors import ConfigurationError, EvidenceError, TEENotAvailableError

REPORT_DATA = bytes(range(64))
AUXBLOB = b"SNP-CERT-TABLE:" + b"\x01" * 40


@dataclass
class KernelEmulator(_ConfigfsTree):
    """Plays the configfs-tsm kernel side on a real directory tree.

    ``race_writes``: how many inblob writes (from the first) get an extra, foreign
    generation bump, as if another process had written the entry concurrently.
    ``omit`` / ``as_directory``: attributes left out of, or created as directories in,
    each new entry. ``short_write``: count returned by inblob writes instead of the real one.
    """

    provider: str = "tdx_guest"
    race_writes: int = 0
    omit: Iterable[str] = ()
    as_directory: Iterable[str] = ()
    with_auxblob: bool = True
    short_write: int | None = None
    outblob_override: bytes | None = None
    generation_text: str | None = None
    early_foreign_privlevel: int = 0  # entries (from the first) another writer touches before us
    mkdir_errno: int | None = None
    rmdir_errno: int | None = None
    mkdirs: list[Path] = field(default_factory=list)
    rmdirs: list[Path] = field(default_factory=list)
    writes: list[tuple[Path, int]] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        self.mkdirs.append(path)
        if self.mkdir_errno is not None:
            raise OSError(self.mkdir_errno, os.strerror(self.mkdir_errno), str(path))
        super().mkdir(path)
        if len(self.mkdirs) <= self.early_foreign_privlevel:
            self.generation_text = "1\n"  # another writer set privlevel right after the mkdir
        elif self.early_foreign_privlevel:
            self.generation_text = None
        attributes = {
            "provider": f"{self.provider}\n",
            "generation": self.generation_text if self.generation_text is not None else "0\n",
            "inblob": "",
            "outblob": "",
            "privlevel": "",
            "privlevel_floor": "0\n",
        }
        if self.with_auxblob and self.provider == "sev_guest":
            attributes["auxblob"] = ""
        for name, content in attributes.items():
            if name in self.omit:
                continue
            if name in self.as_directory:
                (path / name).mkdir()
            else:
                (path / name).write_text(content)

    def rmdir(self, path: Path) -> None:
        self.rmdirs.append(path)
        if self.rmdir_errno is not None:
            raise OSError(self.rmdir_errno, os.strerror(self.rmdir_errno), str(path))
        # configfs removes an entry's attributes with it; a plain directory needs them gone first.
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        super().rmdir(path)

    def write(self, path: Path, data: bytes) -> int:
        self.writes.append((path, len(data)))
        written = super().write(path, data)
        entry = path.parent
        if path.name in ("inblob", "privlevel"):
            bump = 1
            if path.name == "inblob" and self.inblob_writes() <= self.race_writes:
                bump = 2
            generation = int((entry / "generation").read_text()) + bump
            (entry / "generation").write_text(f"{generation}\n")
        if path.name == "inblob":
            outblob = self.outblob_override
            if outblob is None:
                outblob = b"QUOTE|" + self.provider.encode() + b"|" + data + b"|SIGNATURE"
            if (entry / "outblob").is_file():
                (entry / "outblob").write_bytes(outblob)
            if (entry / "auxblob").is_file():
                (entry / "auxblob").write_bytes(AUXBLOB)
            if self.short_write is not None:
                return self.short_write
        return written

    def inblob_writes(self) -> int:
        return sum(1 for path, _ in self.writes if path.name == "inblob")

    def writes_to(self, name: str) -> list[int]:
        return [size for path, size in self.writes if path.name == name]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    report = tmp_path / "tsm" / "report"
    report.mkdir(parents=True)
    return report


def make(root: Path, kernel: KernelEmulator, **options: object) -> TsmProvider:
    return TsmProvider(root, _tree=kernel, **options)  # type: ignore[arg-type]


def assert_no_entries_left(root: Path, kernel: KernelEmulator) -> None:
    assert list(root.iterdir()) == []
    assert sorted(kernel.rmdirs) == sorted(kernel.mkdirs)


# --- success paths ---------------------------------------------------------------------------


def test_tdx_report_binds_report_data_with_one_64_byte_write(root: Path) -> None:
    kernel = KernelEmulator(provider="tdx_guest")
    provider = make(root, kernel)

    evidence = provider.collect(REPORT_DATA)

    assert evidence.tee is TeeType.TDX
    assert REPORT_DATA in evidence.data
    assert evidence.data == b"QUOTE|tdx_guest|" + REPORT_DATA + b"|SIGNATURE"
    assert evidence.aux == b""
    assert kernel.writes_to("inblob") == [64]
    assert kernel.writes == [(kernel.mkdirs[0] / "inblob", 64)]
    assert len(kernel.mkdirs) == 1
    assert_no_entries_left(root, kernel)
    assert provider.tee is TeeType.TDX


def test_sev_snp_report_returns_auxblob(root: Path) -> None:
    kernel = KernelEmulator(provider="sev_guest")

    evidence = make(root, kernel).collect(REPORT_DATA)

    assert evidence.tee is TeeType.SEV_SNP
    assert REPORT_DATA in evidence.data
    assert evidence.aux == AUXBLOB
    assert kernel.writes_to("inblob") == [64]
    assert_no_entries_left(root, kernel)


def test_sev_snp_without_auxblob_attribute_returns_empty_aux(root: Path) -> None:
    kernel = KernelEmulator(provider="sev_guest", with_auxblob=False)

    evidence = make(root, kernel).collect(REPORT_DATA)

    assert evidence.aux == b""
    assert_no_entries_left(root, kernel)


def test_privlevel_is_written_before_inblob_and_counted_in_generation(root: Path) -> None:
    kernel = KernelEmulator(provider="sev_guest")

    evidence = make(root, kernel, privlevel=2).collect(REPORT_DATA)

    assert [path.name for path, _ in kernel.writes] == ["privlevel", "inblob"]
    entry = kernel.mkdirs[0]
    assert kernel.writes == [(entry / "privlevel", 2), (entry / "inblob", 64)]
    assert REPORT_DATA in evidence.data
    assert_no_entries_left(root, kernel)


def test_each_collect_uses_a_fresh_uniquely_named_entry(root: Path) -> None:
    kernel = KernelEmulator()
    provider = make(root, kernel)

    first = provider.collect(REPORT_DATA)
    second = provider.collect(bytes(64))

    assert len(set(kernel.mkdirs)) == 2
    assert all(path.parent == root for path in kernel.mkdirs)
    assert bytes(64) in second.data
    assert REPORT_DATA in first.data
    assert_no_entries_left(root, kernel)


def test_tee_property_probes_the_provider_once_and_cleans_up(root: Path) -> None:
    kernel = KernelEmulator(provider="sev_guest")
    provider = make(root, kernel)

    assert provider.tee is TeeType.SEV_SNP
    assert provider.tee is TeeType.SEV_SNP
    assert len(kernel.mkdirs) == 1
    assert kernel.writes == []
    assert_no_entries_left(root, kernel)


def test_protocol_isinstance_check_probes_at_most_once(root: Path) -> None:
    # Python 3.11's runtime_checkable isinstance evaluates properties, so it triggers the
    # probe; the answer is cached, so later checks and collects do not probe again.
    kernel = KernelEmulator(provider="tdx_guest")
    provider = make(root, kernel)

    assert isinstance(provider, EvidenceProvider)
    assert isinstance(provider, EvidenceProvider)
    provider.collect(REPORT_DATA)

    assert len(kernel.mkdirs) <= 2
    assert_no_entries_left(root, kernel)


# --- the generation race ---------------------------------------------------------------------


def test_concurrent_write_on_first_attempt_is_discarded_and_retried(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = KernelEmulator(race_writes=1)

    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation._tsm"):
        evidence = make(root, kernel).collect(REPORT_DATA)

    assert REPORT_DATA in evidence.data
    assert len(kernel.mkdirs) == 2
    assert kernel.mkdirs[0] != kernel.mkdirs[1]
    assert kernel.writes_to("inblob") == [64, 64]
    assert "generation changed" in caplog.text
    assert_no_entries_left(root, kernel)


def test_a_write_before_the_first_generation_read_is_discarded_and_retried(root: Path) -> None:
    # Such a write is counted in the generation read first, so only the kernel's starting value
    # (0) shows it; a foreign privlevel would otherwise stay in a report we call ours.
    kernel = KernelEmulator(provider="sev_guest", early_foreign_privlevel=1)

    evidence = make(root, kernel).collect(REPORT_DATA)

    assert REPORT_DATA in evidence.data
    assert len(kernel.mkdirs) == 2
    assert kernel.writes_to("inblob") == [64]  # nothing written into the touched entry
    assert_no_entries_left(root, kernel)


@pytest.mark.parametrize("max_attempts", [1, 3, 5])
def test_persistent_race_fails_after_max_attempts(root: Path, max_attempts: int) -> None:
    kernel = KernelEmulator(race_writes=1000)

    with pytest.raises(EvidenceError, match=f"all {max_attempts} attempts"):
        make(root, kernel, max_attempts=max_attempts).collect(REPORT_DATA)

    assert len(kernel.mkdirs) == max_attempts
    assert kernel.writes_to("inblob") == [64] * max_attempts
    assert_no_entries_left(root, kernel)


# --- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), bytes(128)])
def test_wrong_report_data_length_is_rejected_before_anything_is_touched(root: Path, bad: bytes) -> None:
    kernel = KernelEmulator()

    with pytest.raises(ConfigurationError, match="exactly 64 bytes"):
        make(root, kernel).collect(bad)

    assert kernel.mkdirs == []
    assert kernel.writes == []


def test_non_bytes_report_data_is_rejected(root: Path) -> None:
    kernel = KernelEmulator()
    with pytest.raises(ConfigurationError):
        make(root, kernel).collect("x" * 64)  # type: ignore[arg-type]
    assert kernel.mkdirs == []


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": True},
        {"privlevel": 4},
        {"privlevel": -1},
        {"privlevel": True},
        {"expected_tee": TeeType.SGX},
    ],
)
def test_invalid_options_are_configuration_errors(root: Path, options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        TsmProvider(root, **options)  # type: ignore[arg-type]


# --- missing TEE -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True])
def test_missing_root_is_tee_not_available(tmp_path: Path, as_file: bool) -> None:
    if as_file:
        (tmp_path / "report").write_text("")
    with pytest.raises(TEENotAvailableError, match=str(tmp_path / "report")):
        TsmProvider(tmp_path / "report")


def test_root_disappearing_after_construction_is_tee_not_available(root: Path) -> None:
    kernel = KernelEmulator()
    provider = make(root, kernel)
    root.rmdir()

    with pytest.raises(TEENotAvailableError):
        provider.collect(REPORT_DATA)
    assert kernel.mkdirs == []


@pytest.mark.parametrize(
    ("err", "expected"),
    [(errno.ENXIO, TEENotAvailableError), (errno.EACCES, EvidenceError)],
)
def test_mkdir_failure_is_translated(root: Path, err: int, expected: type[Exception]) -> None:
    kernel = KernelEmulator(mkdir_errno=err)

    with pytest.raises(expected, match=os.strerror(err)) as info:
        make(root, kernel).collect(REPORT_DATA)

    assert str(root) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


# --- broken entries: every failure names the path and removes the entry ----------------------


@pytest.mark.parametrize("attribute", ["provider", "generation", "inblob", "outblob"])
@pytest.mark.parametrize(
    ("broken", "reason"),
    # A directory where a file is expected fails reliably even for root, unlike chmod 000.
    [("omit", "No such file or directory"), ("as_directory", "Is a directory")],
)
def test_missing_or_unreadable_attribute_is_evidence_error_naming_the_path(
    root: Path, attribute: str, broken: str, reason: str
) -> None:
    kernel = KernelEmulator(**{broken: [attribute]})  # type: ignore[arg-type]

    with pytest.raises(EvidenceError, match=reason) as info:
        make(root, kernel).collect(REPORT_DATA)

    assert not isinstance(info.value, TEENotAvailableError)
    assert str(kernel.mkdirs[0] / attribute) in str(info.value)
    assert_no_entries_left(root, kernel)


@pytest.mark.parametrize(
    ("kernel_options", "provider_options", "match"),
    [
        pytest.param({"provider": "cca_guest"}, {}, "cca_guest", id="unknown-provider"),
        pytest.param(
            {"provider": "sev_guest"},
            {"expected_tee": TeeType.TDX},
            "tdx evidence was requested",
            id="wrong-tee",
        ),
        pytest.param({"short_write": 32}, {}, "short write .* 32 of 64", id="short-inblob-write"),
        pytest.param({"outblob_override": b""}, {}, "outblob.* is empty", id="empty-outblob"),
        pytest.param({"generation_text": "seven\n"}, {}, "generation", id="garbage-generation"),
        pytest.param({"provider": "sev_guest", "as_directory": ["auxblob"]}, {}, "auxblob", id="bad-auxblob"),
        pytest.param({"omit": ["privlevel"]}, {"privlevel": 1}, "privlevel", id="no-privlevel-attribute"),
    ],
)
def test_broken_entry_is_evidence_error_and_entry_is_removed(
    root: Path, kernel_options: dict[str, object], provider_options: dict[str, object], match: str
) -> None:
    kernel = KernelEmulator(**kernel_options)  # type: ignore[arg-type]

    with pytest.raises(EvidenceError, match=match) as info:
        make(root, kernel, **provider_options).collect(REPORT_DATA)

    assert str(kernel.mkdirs[0]) in str(info.value)
    assert_no_entries_left(root, kernel)


def test_nothing_is_written_before_the_provider_is_validated(root: Path) -> None:
    kernel = KernelEmulator(provider="sev_guest")

    with pytest.raises(EvidenceError):
        make(root, kernel, expected_tee=TeeType.TDX).collect(REPORT_DATA)

    assert kernel.writes == []


def test_failed_rmdir_is_logged_and_does_not_mask_the_result(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = KernelEmulator(rmdir_errno=errno.EBUSY)

    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation._tsm"):
        evidence = make(root, kernel).collect(REPORT_DATA)

    assert REPORT_DATA in evidence.data
    assert kernel.rmdirs == kernel.mkdirs
    assert "could not remove" in caplog.text


# --- the default seam on real files ----------------------------------------------------------


def test_default_tree_writes_once_and_never_creates_files(tmp_path: Path) -> None:
    tree = _ConfigfsTree()
    target = tmp_path / "inblob"
    target.write_bytes(b"")

    assert tree.write(target, REPORT_DATA) == 64
    assert tree.read(target) == REPORT_DATA
    with pytest.raises(FileNotFoundError):
        tree.write(tmp_path / "absent", REPORT_DATA)
    assert not (tmp_path / "absent").exists()

    entry = tmp_path / "entry"
    tree.mkdir(entry)
    assert entry.is_dir()
    tree.rmdir(entry)
    assert not entry.exists()
