"""`enclaveml quantize`: INT8-quantize an ONNX model and report size and held-out accuracy.

Exit codes: 0 written; 1 written, but INT8 accuracy fell by more than ``--max-drop`` points;
3 bad arguments, data files or model (nothing written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from enclaveml.cli._console import console, err_console
from enclaveml.cli._signals import unwind_on_sigterm
from enclaveml.errors import ConfigurationError

EXIT_ACCURACY, EXIT_USAGE = 1, 3


def quantize(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model to quantize.")],
    output: Annotated[Path, typer.Argument(help="Where to write the INT8 model (mode 0600).")],
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration inputs (.npy, or .npz with one array per model input); needed by static.",
        ),
    ] = None,
    method: Annotated[
        Literal["static", "dynamic"],
        typer.Option(help="static: calibrated QDQ (fast on CPU); dynamic: weights only, no calibration."),
    ] = "static",
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--eval", help="Held-out .npz with the model inputs and 'labels', disjoint from calibration."
        ),
    ] = None,
    per_channel: Annotated[bool, typer.Option(help="One weight scale per output channel.")] = False,
    quant_format: Annotated[
        Literal["qdq", "qoperator"], typer.Option("--format", help="Static model format.")
    ] = "qdq",
    max_drop: Annotated[
        float | None,
        typer.Option(help="Exit 1 if top-1 accuracy drops by more than this many percentage points."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Quantize MODEL to INT8 into OUTPUT; print sizes and FP32 vs INT8 accuracy on --eval data."""
    # Imported on use: onnx and ONNX Runtime take a while to load, and other commands never need them.
    from enclaveml.serving.quantize import quantize_model

    try:
        if max_drop is not None and evaluation is None:
            raise ConfigurationError("--max-drop needs --eval data to measure accuracy on")
        with unwind_on_sigterm():
            report = quantize_model(
                model,
                output,
                calibration=calibration,
                method=method,
                per_channel=per_channel,
                quant_format=quant_format,
                evaluation=evaluation,
            )
    except ConfigurationError as exc:
        if as_json:
            console.print_json(json.dumps({"model": str(model), "error": str(exc)}))
        else:
            err_console.print(f"[bold red]quantization failed:[/bold red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    result = report.to_dict()
    change = report.accuracy_change
    # In points as the table prints them (2 decimals): 0.99 - 0.98 is 0.0100000000000000089 in floats,
    # and a drop printed as the limit is within it.
    too_low = max_drop is not None and change is not None and round(-change * 100, 2) > max_drop
    result["accepted"] = not too_low
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(_report_table(result))
        if too_low:
            console.print(f"[bold red]accuracy fell by more than {max_drop:g} points[/bold red]")
    if too_low:
        raise typer.Exit(EXIT_ACCURACY)


def _report_table(result: dict[str, Any]) -> Table:
    table = Table(title="INT8 quantization", show_header=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    per_channel = "per-channel" if result["per_channel"] else "per-tensor"
    table.add_row("model", f"{result['source']} -> {result['destination']}")
    table.add_row("method", f"{result['method']} ({result['quant_format']}, {per_channel})")
    table.add_row("types", f"activations {result['activation_type']}, weights {result['weight_type']}")
    table.add_row(
        "size",
        f"{_size(result['fp32_bytes'])} -> {_size(result['int8_bytes'])} ({result['size_ratio']:.2f}x)",
    )
    table.add_row("quantized ops", ", ".join(f"{k} {v}" for k, v in result["quantized_ops"].items()))
    table.add_row("calibration samples", str(result["calibration_samples"]))
    if result["fp32_accuracy"] is None:
        table.add_row("accuracy", "not measured (no --eval data)")
    else:
        table.add_row("eval samples (held out)", str(result["eval_samples"]))
        table.add_row("FP32 top-1", f"{result['fp32_accuracy']:.2%}")
        table.add_row("INT8 top-1", f"{result['int8_accuracy']:.2%}")
        table.add_row("change", f"{result['accuracy_change'] * 100:+.2f} points")
    table.add_row("time", f"{result['seconds']:.1f} s")
    return table


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
