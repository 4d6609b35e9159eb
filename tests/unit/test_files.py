"""enclaveml._files: files appear complete with their mode from the first byte, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from enclaveml import _files
from enclaveml._files import atomic_file, write_atomically


@pytest.fixture(params=["unnamed", "named-fallback"])
def mode_of_creation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "named-fallback":
        monkeypatch.setattr(_files, "_unnamed_file", lambda directory: None)
    else:
        probe = _files._unnamed_file(Path("/tmp"))
        if probe is None:
            pytest.skip("no O_TMPFILE here")
        os.close(probe)
    return str(request.param)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_with_the_exact_mode_whatever_the_umask(tmp_path: Path, mode_of_creation: str) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, b"new contents" * 1000, mode=0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new contents" * 1000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _entries(tmp_path) == ["key.pem"]


def test_a_failure_leaves_the_old_file_and_nothing_else(tmp_path: Path, mode_of_creation: str) -> None:
    target = tmp_path / "checkpoint"
    target.write_bytes(b"old")
    seen: list[list[str]] = []

    def fail_mid_write() -> None:
        with atomic_file(target) as fd:
            os.write(fd, b"half of the new")
            seen.append(_entries(tmp_path))
            raise RuntimeError("mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        fail_mid_write()
    assert target.read_bytes() == b"old"
    assert _entries(tmp_path) == ["checkpoint"]
    # While it was written, the new file had no name at all where O_TMPFILE works.
    assert (seen[0] == ["checkpoint"]) == (mode_of_creation == "unnamed")


def test_durable_writes_sync_the_data_and_the_directory(
    tmp_path: Path, mode_of_creation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(_files.os, "fsync", spy)
    write_atomically(tmp_path / "a", b"x")
    assert synced == ["file", "dir"]
    synced.clear()
    with atomic_file(tmp_path / "b") as fd:
        os.write(fd, b"y")
    assert synced == []  # not asked to be durable
    assert (tmp_path / "b").read_bytes() == b"y"


def test_a_missing_directory_raises_file_not_found(tmp_path: Path, mode_of_creation: str) -> None:
    with pytest.raises(FileNotFoundError), atomic_file(tmp_path / "missing" / "file"):
        pass


def test_if_naming_the_unnamed_file_is_refused_its_content_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = _files._unnamed_file(tmp_path)
    if probe is None:
        pytest.skip("no O_TMPFILE here")
    os.close(probe)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # e.g. a sandbox refusing linkat via /proc

    monkeypatch.setattr(_files.os, "link", refused)
    data = os.urandom(3 << 20)
    write_atomically(tmp_path / "model.bin", data, mode=0o640)
    assert (tmp_path / "model.bin").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "model.bin").stat().st_mode) == 0o640
    assert _entries(tmp_path) == ["model.bin"]
