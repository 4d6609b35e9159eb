"""The serving benchmark's machinery, end to end on the tiny digits model, so that it cannot rot.

Runs ``benchmarks.serving.run_benchmark`` for about a second per configuration: the plain
server, the RA-TLS front end with the encrypted Redis queue and its worker (each a process),
attestation and pinning, the load processes, the accounting, and the JSON it writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import benchmarks._common
import pytest
from benchmarks._common import write_results
from benchmarks.serving import CONFIGS, Settings, null_only, run_benchmark

from tests.serving_models import digits_model


@pytest.mark.usefixtures("redis_server")  # skips (or fails under CI) where redis-server is missing
@pytest.mark.timeout(60)
def test_serving_benchmark_produces_sane_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_bytes, x_test, _ = digits_model()
    model = tmp_path / "digits.onnx"
    model.write_bytes(model_bytes)
    settings = Settings(rounds=1, seconds=1.0, warmup_s=0.3, clients=8, processes=2, max_delay_ms=2.0)

    results = run_benchmark(model, "digits", x_test[:1], settings)

    monkeypatch.setattr(benchmarks._common, "RESULTS", tmp_path / "results")
    written = json.loads(write_results("serving-smoke", results).read_text())
    assert written["benchmark"] == "serving-smoke"
    assert written["config"]["request_body_bytes"] > 64 * 4
    for config in CONFIGS:
        row = written["configs"][config]
        assert row["images_per_s"] > 0, config
        assert row["errors"] == 0, config
        assert row["requests_measured"] > 0, config
        assert 0 <= row["p50_ms"] <= row["p99_ms"], config
        assert all(math.isfinite(v) and v >= 0 for v in row["cpu_ms_per_image"].values()), config
    assert set(written["configs"]["secure"]["cpu_ms_per_image"]) == {"front_end", "worker", "redis", "load"}
    for ratio in written["ratios"].values():
        assert ratio["median"] > 0
    # Both servers batched: the plain server and the queue worker each ran the model.
    assert sum(written["batch_sizes"]["plain"]["digits:1"].values()) > 0
    assert sum(written["batch_sizes"]["worker"]["digits:1"].values()) > 0


@pytest.mark.usefixtures("redis_server")
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("side", "output"), [(224, "serving-null-model"), (16, "serving-null-model-side-16")]
)
def test_null_model_pass_reports_serving_cpu_per_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int, output: str
) -> None:
    """``--null-model [--image-side N]``: serving cost per image by process, plain vs secure, as JSON."""
    monkeypatch.setattr(benchmarks._common, "RESULTS", tmp_path / "results")
    settings = Settings(rounds=1, seconds=1.0, warmup_s=0.3, clients=8, processes=2, max_delay_ms=2.0)

    null_only(settings, side)

    written = json.loads((tmp_path / "results" / f"{output}.json").read_text())
    assert written["image_side"] == side
    extra = written["overhead"]
    assert extra["request_tensor_bytes"] == 3 * side * side * 4
    assert set(extra["plain"]) == {"plain_server", "load"}
    assert set(extra["secure"]) == {"front_end", "worker", "redis", "load"}
    for config in ("plain", "secure"):
        assert all(math.isfinite(v) and v >= 0 for v in extra[config].values()), config
        assert extra["total_ms"][config] == pytest.approx(sum(extra[config].values()), abs=0.05)
        assert extra["images_per_s"][config] > 0
    assert extra["secure"]["front_end"] > 0  # the front end seals and enqueues every image
    assert "cpu_bound_prediction" not in extra  # no inference time to predict from
