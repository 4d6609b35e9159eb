"""keep_freed_memory: image-sized buffers freed by one request are reused by the next, not re-faulted."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Allocate and free 64 buffers of a 600 KB image, three times; minor page faults per round.
_ROUNDS = """
import json, resource, sys
from enclaveml._memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [bytearray(600_000) for _ in range(64)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _rounds(mode: str) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin"}  # no GLIBC_TUNABLES from outside
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    kept = _rounds("keep")
    assert kept["applied"] is True
    pages = 64 * 600_000 // 4096
    first, *later = kept["faults"]  # type: ignore[misc]
    assert first >= pages // 2  # the first round maps its memory once
    assert max(later) < pages // 20  # later rounds reuse it
    # Control: with glibc's defaults every round faults the buffers in again.
    default = _rounds("default")
    assert min(default["faults"]) > pages // 2  # type: ignore[type-var]
