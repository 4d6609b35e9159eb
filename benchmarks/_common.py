"""Helpers shared by the benchmark scripts: timing loops and JSON result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def rate(fn: Callable[[], object], *, min_seconds: float = 2.0, min_calls: int = 20) -> float:
    """Calls per second of ``fn``, measured for at least ``min_seconds`` after one warm-up call."""
    fn()
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and calls >= min_calls:
            return calls / elapsed


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` with machine metadata to benchmarks/results/NAME.json and return the path."""
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **results,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
