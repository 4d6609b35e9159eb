"""ResNet-50 images/s in ONNX Runtime: FP32 against statically quantized INT8, side by side.

ResNet-50 (bottleneck blocks [3, 4, 6, 3]) is defined here in plain torch with random weights
(seeded), exported with torch's TorchScript ONNX exporter (``dynamo=False``: the dynamo exporter
needs onnxscript, which is not installed) at opset 17, and quantized with
:func:`enclaveml.serving.quantize.quantize_model` (uint8 activations, int8 weights, calibrated on
random images). Four INT8 variants are tried: QDQ and QOperator, per-tensor and per-channel
weights; the fastest one is the headline. Every model is measured at batch 1, 8 and 16 with two
intra-op threads, in rounds that run every model back to back (order rotating). Images/s are
medians over rounds; a ratio is the median of per-round ratios, each taken between adjacent
measurements, so that load from other processes on a shared machine hits both sides alike.
Goal: INT8 at least 2.0x FP32.

The sanity check compares FP32 and INT8 logits on held-out random images: top-1 agreement, FP32's
top-1 within INT8's top-5, and cosine similarity. Random weights have no accuracy to lose, and on
noise images their logits are dominated by a component shared by all images (a handful of classes
win, by small margins), so agreement is a weak check here: a broken quantization still shows (agreement
and cosine collapse), a slightly noisier one moves top-1 more than a trained network's would.

Exported and quantized models are cached by content under ``$ENCLAVEML_BENCH_CACHE`` (default
``~/.cache/enclaveml/benchmarks``). Run: ``.venv/bin/python -m benchmarks.int8_resnet50``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from benchmarks._common import rate, write_results
from enclaveml.errors import ConfigurationError
from enclaveml.serving.quantize import quantize_model

ort: Any = importlib.import_module("onnxruntime")  # ships no type information
OPSET, SEED, THREADS, BATCHES, GOAL = 17, 0, 2, (1, 8, 16), 2.0
CALIBRATION_IMAGES, AGREEMENT_IMAGES = 32, 64
VARIANTS: dict[str, dict[str, Any]] = {
    "qdq-per-tensor": {"quant_format": "qdq", "per_channel": False},
    "qdq-per-channel": {"quant_format": "qdq", "per_channel": True},
    "qoperator-per-tensor": {"quant_format": "qoperator", "per_channel": False},
    "qoperator-per-channel": {"quant_format": "qoperator", "per_channel": True},
}


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus the (projected) shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


class ResNet50(nn.Module):
    """The torchvision-equivalent ResNet-50 v1.5 layout (stride on the 3x3), 1000 classes."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        channels = 64
        for stage, count in enumerate(blocks):
            width = 64 * 2**stage
            for index in range(count):
                layers.append(Bottleneck(channels, width, 2 if index == 0 and stage > 0 else 1))
                channels = width * 4
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(self.features(x)), 1))
        return out


def images(count: int, seed: int) -> NDArray[np.float32]:
    """Random 224x224 RGB images, normalised like ImageNet inputs (zero mean, unit variance)."""
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224), dtype=np.float32)


def build_fp32(path: Path) -> None:
    """Seeded random ResNet-50 with BatchNorm statistics measured on random images, exported to ONNX.

    Fresh BatchNorm layers (mean 0, variance 1) leave activations badly scaled through 16 blocks;
    measuring the statistics gives layers normalised as in a trained network, so activation
    ranges, and therefore quantization, behave realistically. Export folds BatchNorm into the convs.
    """
    torch.manual_seed(SEED)
    model = ResNet50()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for seed in (101, 102):
            model(torch.from_numpy(images(8, seed)))
    model.eval()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.onnx.export(
        model,
        (torch.from_numpy(images(1, 103)),),
        partial,
        dynamo=False,
        opset_version=OPSET,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    exported = onnx.load(str(partial))
    exported.ir_version = min(exported.ir_version, 10)  # onnxruntime 1.31 loads IR <= 13
    onnx.save(exported, str(partial))
    partial.replace(path)  # renamed when complete: an interrupted run leaves no truncated cache entry


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "enclaveml" / "benchmarks"
    folder = Path(os.environ.get("ENCLAVEML_BENCH_CACHE") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def model_key() -> str:
    """Content key of the FP32 model: everything that shapes the exported bytes."""
    sources = [inspect.getsource(obj) for obj in (Bottleneck, ResNet50, images, build_fp32)]
    material = "\n".join([*sources, torch.__version__, onnx.__version__, str(OPSET), str(SEED)])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prepare_fp32(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Export (or take from the cache) the FP32 model; also used by ``benchmarks.serving``."""
    fp32 = folder / f"resnet50-fp32-{model_key()}.onnx"
    info: dict[str, Any] = {"cached": fp32.exists()}
    if not fp32.exists():
        started = time.perf_counter()
        build_fp32(fp32)
        info["export_seconds"] = round(time.perf_counter() - started, 1)
    info["bytes"] = fp32.stat().st_size
    return fp32, info


def prepare(folder: Path) -> tuple[Path, dict[str, Path], dict[str, Any]]:
    """Export and quantize (or take from the cache) the FP32 model and every INT8 variant."""
    key, info = model_key(), dict[str, dict[str, Any]]()
    fp32, info["fp32"] = prepare_fp32(folder)
    calibration = images(CALIBRATION_IMAGES, 1)
    quantized = {}
    for name, options in VARIANTS.items():
        material = f"{key} {ort.__version__} {sorted(options.items())} {CALIBRATION_IMAGES}"
        digest = hashlib.sha256(material.encode()).hexdigest()
        path = folder / f"resnet50-int8-{name}-{digest[:16]}.onnx"
        facts = path.with_suffix(".json")  # what quantizing took, kept for cached reruns
        if path.exists():
            recorded = json.loads(facts.read_text()) if facts.exists() else {}
            info[name] = {"cached": True, "bytes": path.stat().st_size, **recorded}
        else:
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:
                report = quantize_model(
                    fp32, partial, calibration=calibration, batch_size=8, threads=THREADS, **options
                )
            except ConfigurationError as exc:  # an ORT quantizer bug in one variant must not end the run
                info[name] = {"error": str(exc)}
                continue
            recorded = {"quantize_seconds": round(report.seconds, 1), "quantized_ops": report.quantized_ops}
            facts.write_text(json.dumps(recorded))
            partial.replace(path)
            info[name] = {"cached": False, "bytes": report.int8_bytes, **recorded}
        quantized[name] = path
    return fp32, quantized, info


def logits(sess: Any, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.concatenate(
        [sess.run(None, {"images": batch[i : i + 16]})[0] for i in range(0, len(batch), 16)]
    )


def agreement(reference: NDArray[np.float32], other: NDArray[np.float32]) -> dict[str, float]:
    """How closely INT8 logits follow FP32 ones, image by image."""
    top1 = reference.argmax(1)
    top5 = np.argsort(other, axis=1)[:, -5:]
    cosine = (reference * other).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(other, axis=1)
    return {
        "top1_agreement": float((other.argmax(1) == top1).mean()),
        "fp32_top1_in_int8_top5": float((top5 == top1[:, None]).any(1).mean()),
        "mean_cosine": float(cosine.mean()),
        "distinct_fp32_top1_classes": int(np.unique(top1).size),
    }


def measure(sessions: dict[str, Any], rounds: int, seconds: float) -> dict[int, dict[str, list[float]]]:
    """Images/s per batch size, model and round; every round measures every model back to back.

    The order rotates from round to round so that no model always runs after the same neighbour,
    and a ratio is taken within a round (adjacent measurements), so that load from other processes
    on a shared machine hits both sides of a ratio alike.
    """
    names = list(sessions)
    samples: dict[int, dict[str, list[float]]] = {b: {n: [] for n in names} for b in BATCHES}
    for batch in BATCHES:
        feed = {"images": images(batch, 200 + batch)}
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                calls = rate(
                    functools.partial(sessions[name].run, None, feed), min_seconds=seconds, min_calls=2
                )
                samples[batch][name].append(calls * batch)
    return samples


def summarise(samples: dict[str, list[float]], name: str) -> dict[str, Any]:
    """Best and median images/s of ``name``, and the median of its per-round ratios to FP32."""
    paired = [value / fp32 for value, fp32 in zip(samples[name], samples["fp32"], strict=True)]
    return {
        "best_images_per_s": round(max(samples[name]), 2),
        "median_images_per_s": round(float(np.median(samples[name])), 2),
        "median_ratio_vs_fp32": round(float(np.median(paired)), 3),
        "ratio_range": [round(min(paired), 2), round(max(paired), 2)],
    }


def cpu_description() -> dict[str, Any]:
    """The CPU and its integer-dot-product features: INT8 speed-ups depend on them (VNNI, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model": model, "int8_features": [f for f in wanted if f in flags], "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)  # the export's calibration passes must not oversubscribe 2 cores
    fp32_path, int8_paths, prep = prepare(cache_dir())
    sessions = {"fp32": session(fp32_path)} | {name: session(path) for name, path in int8_paths.items()}
    held_out = images(AGREEMENT_IMAGES, 2)  # disjoint from calibration (seed 1) and timing inputs
    reference = logits(sessions["fp32"], held_out)
    checks = {name: agreement(reference, logits(sessions[name], held_out)) for name in int8_paths}
    load_before = os.getloadavg()
    samples = measure(sessions, args.rounds, args.seconds)
    stats = {b: {n: summarise(samples[b], n) for n in sessions} for b in BATCHES}
    ratio = {n: float(np.mean([stats[b][n]["median_ratio_vs_fp32"] for b in BATCHES])) for n in int8_paths}
    chosen = max(ratio, key=lambda n: ratio[n])
    table = [
        {
            "batch": b,
            "fp32_images_per_s": stats[b]["fp32"]["median_images_per_s"],
            "int8_images_per_s": stats[b][chosen]["median_images_per_s"],
            "ratio": stats[b][chosen]["median_ratio_vs_fp32"],
            "ratio_range": stats[b][chosen]["ratio_range"],
        }
        for b in BATCHES
    ]
    variants = {name: {**VARIANTS[name], **prep[name]} for name in VARIANTS}
    for name in int8_paths:
        variants[name] |= {**checks[name], "mean_ratio": round(ratio[name], 3)}
        variants[name]["by_batch"] = {str(b): stats[b][name] for b in BATCHES}
    results = {
        "config": {
            "model": "ResNet-50 (plain torch, random weights, seed 0), 3x224x224",
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": OPSET,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "intra_op_num_threads": THREADS,
            "activation_type": "uint8",
            "weight_type": "int8",
            "calibration_images": CALIBRATION_IMAGES,
            "agreement_images": AGREEMENT_IMAGES,
            "rounds": args.rounds,
            "min_seconds": args.seconds,
        },
        "cpu": cpu_description(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "fp32": prep["fp32"] | {"by_batch": {str(b): stats[b]["fp32"] for b in BATCHES}},
        "samples_images_per_s": {str(b): samples[b] for b in BATCHES},
        "chosen_variant": chosen,
        "table": table,
        "goal_ratio": GOAL,
        "goal_met": all(row["ratio"] >= GOAL for row in table),
        "variants": variants,
    }
    path = write_results("int8_resnet50", results)
    print(f"{'batch':>5} {'FP32 img/s':>11} {'INT8 img/s':>11} {'ratio':>6}   INT8 = {chosen}")
    for row in table:
        print(
            f"{row['batch']:>5} {row['fp32_images_per_s']:>11.1f} {row['int8_images_per_s']:>11.1f} "
            f"{row['ratio']:>5.2f}x  (rounds {row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}x)"
        )
    for name, v in variants.items():
        if "error" in v:
            print(f"  {name:<22} failed: {v['error']}")
            continue
        print(
            f"  {name:<22} mean {v['mean_ratio']:.2f}x  top-1 agreement {v['top1_agreement']:.0%}"
            f"  cosine {v['mean_cosine']:.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
