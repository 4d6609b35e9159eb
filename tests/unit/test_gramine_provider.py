"""GramineProvider against a real temporary directory standing in for ``/dev/attestation``.

Plain files play Gramine's pseudo-files: ``user_report_data`` keeps what was written, so
tests can check exactly what the provider handed over; ``quote`` is fixed content.
Write calls are counted by wrapping the module's single-write helper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from enclaveml.attestation import _gramine
from enclaveml.attestation.evidence import EvidenceProvider, TeeType
from enclaveml.attestation.providers import GramineProvider
from enclaveml.errors import ConfigurationError, EvidenceError, TEENotAvailableError

REPORT_DATA = bytes(range(100, 164))
QUOTE = b"\x03\x00\x02\x00" + b"\x00" * 44 + b"GRAMINE-DCAP-QUOTE-BODY" * 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    attestation = tmp_path / "dev" / "attestation"
    attestation.mkdir(parents=True)
    (attestation / "attestation_type").write_text("dcap")
    (attestation / "user_report_data").write_bytes(b"")
    (attestation / "quote").write_bytes(QUOTE)
    return attestation


@pytest.fixture
def write_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    calls: list[tuple[Path, int]] = []
    real: Callable[[Path, bytes], int] = _gramine._write_once

    def recording(path: Path, data: bytes) -> int:
        calls.append((path, len(data)))
        return real(path, data)

    monkeypatch.setattr(_gramine, "_write_once", recording)
    return calls


def test_collect_writes_report_data_once_and_returns_the_quote(
    root: Path, write_calls: list[tuple[Path, int]]
) -> None:
    provider = GramineProvider(root)

    evidence = provider.collect(REPORT_DATA)

    assert evidence.tee is TeeType.SGX
    assert evidence.data == QUOTE
    assert evidence.aux == b""
    assert write_calls == [(root / "user_report_data", 64)]
    assert (root / "user_report_data").read_bytes() == REPORT_DATA
    assert provider.tee is TeeType.SGX
    assert isinstance(provider, EvidenceProvider)


def test_attestation_type_with_trailing_newline_is_accepted(root: Path) -> None:
    (root / "attestation_type").write_text("dcap\n")
    assert GramineProvider(root).collect(REPORT_DATA).data == QUOTE


@pytest.mark.parametrize("bad", [b"", bytes(32), bytes(63), bytes(65)])
def test_wrong_report_data_length_is_rejected_before_writing(
    root: Path, write_calls: list[tuple[Path, int]], bad: bytes
) -> None:
    with pytest.raises(ConfigurationError, match="exactly 64 bytes"):
        GramineProvider(root).collect(bad)
    assert write_calls == []
    assert (root / "user_report_data").read_bytes() == b""


@pytest.mark.parametrize(
    ("kind", "hint"),
    [("none", "disabled"), ("epid", "EPID"), ("sgx-la", "requires 'dcap'")],
)
def test_non_dcap_attestation_type_is_rejected_with_the_manifest_fix(
    root: Path, write_calls: list[tuple[Path, int]], kind: str, hint: str
) -> None:
    (root / "attestation_type").write_text(kind)

    with pytest.raises(EvidenceError) as info:
        GramineProvider(root).collect(REPORT_DATA)

    message = str(info.value)
    assert kind in message
    assert hint in message
    assert 'sgx.remote_attestation = "dcap"' in message
    assert write_calls == []


def test_missing_root_is_tee_not_available(tmp_path: Path) -> None:
    with pytest.raises(TEENotAvailableError, match=str(tmp_path / "attestation")):
        GramineProvider(tmp_path / "attestation")


def test_root_that_is_a_file_is_tee_not_available(tmp_path: Path) -> None:
    (tmp_path / "attestation").write_text("")
    with pytest.raises(TEENotAvailableError):
        GramineProvider(tmp_path / "attestation")


def test_root_disappearing_after_construction_is_tee_not_available(root: Path) -> None:
    provider = GramineProvider(root)
    for child in root.iterdir():
        child.unlink()
    root.rmdir()

    with pytest.raises(TEENotAvailableError):
        provider.collect(REPORT_DATA)


@pytest.mark.parametrize("name", ["attestation_type", "user_report_data", "quote"])
def test_missing_file_is_evidence_error_naming_path_and_reason(root: Path, name: str) -> None:
    (root / name).unlink()

    with pytest.raises(EvidenceError, match="No such file or directory") as info:
        GramineProvider(root).collect(REPORT_DATA)

    assert not isinstance(info.value, TEENotAvailableError)
    assert str(root / name) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("name", ["attestation_type", "user_report_data", "quote"])
def test_unreadable_file_is_evidence_error_naming_path_and_reason(root: Path, name: str) -> None:
    # A directory in place of the file fails reliably even when tests run as root.
    (root / name).unlink()
    (root / name).mkdir()

    with pytest.raises(EvidenceError, match="Is a directory") as info:
        GramineProvider(root).collect(REPORT_DATA)

    assert str(root / name) in str(info.value)


def test_user_report_data_is_never_created(root: Path) -> None:
    (root / "user_report_data").unlink()

    with pytest.raises(EvidenceError):
        GramineProvider(root).collect(REPORT_DATA)
    assert not (root / "user_report_data").exists()


def test_empty_quote_is_evidence_error(root: Path) -> None:
    (root / "quote").write_bytes(b"")

    with pytest.raises(EvidenceError, match="empty quote"):
        GramineProvider(root).collect(REPORT_DATA)


def test_short_write_is_evidence_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gramine, "_write_once", lambda path, data: 32)

    with pytest.raises(EvidenceError, match="short write") as info:
        GramineProvider(root).collect(REPORT_DATA)

    assert "32 of 64" in str(info.value)
    assert str(root / "user_report_data") in str(info.value)


def test_concurrent_collects_each_get_a_quote_over_their_own_report_data(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like Gramine, the fake quote is made from whatever user_report_data holds when it is read."""
    real_read = GramineProvider._read

    def quote_of_current_report_data(self: GramineProvider, path: Path) -> bytes:
        if path.name == "quote":
            time.sleep(0.001)  # a quote takes a while: the window another writer would use
            return b"QUOTE:" + (root / "user_report_data").read_bytes()
        return real_read(self, path)

    monkeypatch.setattr(GramineProvider, "_read", quote_of_current_report_data)
    providers = [GramineProvider(root) for _ in range(2)]  # two providers, one enclave

    def collect(i: int) -> bool:
        data = i.to_bytes(64, "big")
        return providers[i % 2].collect(data).data == b"QUOTE:" + data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(collect, range(200)))
