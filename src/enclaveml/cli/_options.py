"""Command-line options that several commands share, declared once so their names and help agree.

Each is an ``Annotated`` type for a typer parameter; the default stays at the use site
(``tee: Tee = "auto"``), since it differs between commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from enclaveml.attestation.providers import PROVIDER_NAMES

__all__ = [
    "BatchDelay",
    "BatchSize",
    "ClusterKey",
    "Host",
    "HttpsPort",
    "Kbs",
    "KbsCa",
    "ModelSpecs",
    "PrintMeasurement",
    "Tee",
    "Threads",
]

Kbs = Annotated[str, typer.Option("--kbs", envvar="ENCLAVEML_KBS_URL", help="Key broker URL.")]
KbsCa = Annotated[
    Path | None, typer.Option("--kbs-ca", envvar="ENCLAVEML_KBS_CA", help="Broker certificate/CA to pin.")
]
Tee = Annotated[str, typer.Option(help=f"Evidence provider: {', '.join(PROVIDER_NAMES)}.")]
PrintMeasurement = Annotated[
    bool, typer.Option(help="With --tee simulation: print the workload measurement (for policies) and exit.")
]
Host = Annotated[str, typer.Option(help="Address to listen on.")]
HttpsPort = Annotated[int, typer.Option(help="HTTPS port.")]

# Serving (front end and queue worker).
ModelSpecs = Annotated[
    list[str], typer.Option("--model", help="NAME=PATH.sealed; repeat for several models.")
]
ClusterKey = Annotated[str, typer.Option(help="Broker key id of the queue's cluster key.")]
BatchSize = Annotated[int, typer.Option(help="Dynamic batching: rows per batch.")]
BatchDelay = Annotated[float, typer.Option(help="Dynamic batching: wait for company.")]
Threads = Annotated[
    int | None, typer.Option(help="ONNX Runtime intra-op threads per instance [default: cores / instances].")
]
Instances = Annotated[
    int,
    typer.Option(
        min=1,
        help="Batches of a model run at once: 1 for the lowest latency, one per core for throughput.",
    ),
]
