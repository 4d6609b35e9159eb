"""settle_collector: start-up objects leave the collector's scans, and young passes become rare.

Run in a fresh interpreter each time, since it changes the whole process's collector.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Import what a server imports, then count what a full pass scans and how many young passes
# 5,000 surplus container objects (in-flight request state, say) trigger.
_PROBE = """
import gc, json, sys
import fastapi, numpy, onnxruntime
from enclaveml._collector import settle_collector
if sys.argv[1] == "settled":
    settle_collector()
scanned = len(gc.get_objects())
young = []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 0 and young.append(1))
held = [{} for _ in range(5000)]
print(json.dumps({"scanned": scanned, "young_passes": len(young), "frozen": gc.get_freeze_count()}))
"""


def _probe(mode: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    result: dict[str, int] = json.loads(done.stdout)
    return result


def test_settled_collector_skips_start_up_objects_and_runs_young_passes_rarely() -> None:
    default, settled = _probe("default"), _probe("settled")
    # Control: by default a full pass scans every start-up object, and 5,000 surplus objects
    # trigger a young pass about every 700.
    assert default["frozen"] == 0
    assert default["scanned"] > 20_000
    assert default["young_passes"] >= 5
    # Settled: those objects are frozen (out of every generation) and no young pass ran.
    assert settled["frozen"] > 20_000
    assert settled["scanned"] < default["scanned"] // 10
    assert settled["young_passes"] == 0
