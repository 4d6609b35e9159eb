"""Which broker TLS key files count as in memory (and so skip the world-readable warning)."""

from __future__ import annotations

import os
from pathlib import Path

from enclaveml.attestation.tls import in_memory_key_files
from enclaveml.kms.server import _is_memfd


def test_only_an_anonymous_memory_file_counts_as_in_memory(tmp_path: Path) -> None:
    with in_memory_key_files(b"cert", b"key") as (_, keyfile):
        assert _is_memfd(keyfile)
    on_disk = tmp_path / "key.pem"
    on_disk.write_bytes(b"key")
    on_disk.chmod(0o644)
    fd = os.open(on_disk, os.O_RDONLY)
    try:  # a file on disk reached through /proc/self/fd is still a file on disk
        assert not _is_memfd(f"/proc/self/fd/{fd}")
        assert not _is_memfd(f"/proc/self/fd/../fd/{fd}")
    finally:
        os.close(fd)
    assert not _is_memfd(on_disk)
    assert not _is_memfd(tmp_path / "missing")
