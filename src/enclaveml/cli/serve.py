"""`enclaveml serve` (the confidential inference server) and `enclaveml predict` (its verifying client).

``serve`` attests to the key broker, receives each model's key, unseals the models in memory,
and serves them over RA-TLS. ``predict`` verifies the server against a policy (certificate and
a fresh nonce) before it sends any input. Exit codes: 0 done; 1 refused (policy, key release);
2 failed (verification, server error); 3 bad arguments or files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from enclaveml._urls import certificate_names, url_host
from enclaveml.cli._console import console, err_console
from enclaveml.cli._options import (
    BatchDelay,
    BatchSize,
    ClusterKey,
    Host,
    HttpsPort,
    Instances,
    Kbs,
    KbsCa,
    ModelSpecs,
    PrintMeasurement,
    Tee,
    Threads,
)
from enclaveml.errors import (
    BindingError,
    ConfigurationError,
    EnclaveMLError,
    KeyReleaseDeniedError,
    PolicyRejectedError,
)

EXIT_REFUSED, EXIT_FAILED, EXIT_USAGE = 1, 2, 3


def _parse_models(specs: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigurationError(f"--model takes NAME=PATH.sealed, got {spec!r}")
        if name in models:
            raise ConfigurationError(f"model {name!r} is given twice")
        models[name] = Path(path)
    return models


def workload_config(models: dict[str, Path], queue: str | None) -> dict[str, Any]:
    """What the simulated measurement covers besides the code: served model names and the queue mode."""
    return {"models": sorted(models), "queue": "redis" if queue else "in-process"}


def _exit_code(exc: EnclaveMLError) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, PolicyRejectedError | KeyReleaseDeniedError | BindingError):
        return EXIT_REFUSED
    return EXIT_FAILED


def serve(
    model: ModelSpecs,
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    tee: Tee = "auto",
    host: Host = "127.0.0.1",
    port: HttpsPort = 8443,
    max_batch_size: BatchSize = 16,
    max_delay_ms: BatchDelay = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting per model before 429.")] = 256,
    instances: Instances = 1,
    threads: Threads = None,
    queue: Annotated[
        str | None, typer.Option(help="redis://... : scale out through encrypted Redis Streams to workers.")
    ] = None,
    cluster_key: ClusterKey = "enclaveml-cluster",
    tls_name: Annotated[
        list[str] | None,
        typer.Option(
            help="A host name or IP address clients use to reach this server (repeatable): named in the "
            "certificate for clients that check host names, besides localhost and --host."
        ),
    ] = None,
    print_measurement: PrintMeasurement = False,
) -> None:
    """Attest, obtain model keys, unseal models in memory, and serve them over RA-TLS."""
    try:
        models = _parse_models(model)
        provider = _provider(tee, "enclaveml serve", workload_config(models, queue), print_measurement)
        if print_measurement:
            return
        if not kbs:
            raise ConfigurationError("--kbs URL (or ENCLAVEML_KBS_URL) is required")
        options = {
            "max_batch_size": max_batch_size,
            "max_delay_ms": max_delay_ms,
            "max_queue": max_queue,
            "instances": instances,
        }
        names = certificate_names(host, tls_name or ())
        _run_server(provider, models, kbs, kbs_ca, (host, port, names), threads, queue, cluster_key, options)
    except EnclaveMLError as exc:
        err_console.print(f"[bold red]serve failed:[/bold red] {exc}")
        raise typer.Exit(_exit_code(exc)) from None


def _provider(tee: str, entry_point: str, config: dict[str, Any], print_measurement: bool) -> Any:
    from enclaveml.attestation import provider_by_name

    if tee.strip().lower() == "simulation":
        from enclaveml.attestation.simulation import SimulationProvider
        from enclaveml.cli._console import simulation_banner

        simulation_banner()
        provider = SimulationProvider(entry_point=entry_point, config=config)
        if print_measurement:
            typer.echo(provider.measurement.hex())
        return provider
    if print_measurement:
        raise ConfigurationError("--print-measurement needs --tee simulation (hardware measures itself)")
    return provider_by_name(tee)


def _run_server(
    provider: Any,
    models: dict[str, Path],
    kbs: str,
    kbs_ca: Path | None,
    listen: tuple[str, int, tuple[tuple[str, ...], tuple[str, ...]]],
    threads: int | None,
    queue_url: str | None,
    cluster_key: str,
    options: dict[str, Any],
) -> None:
    import uvicorn

    from enclaveml._collector import settle_collector
    from enclaveml._memory import keep_freed_memory
    from enclaveml._web import attestation_hook, uvicorn_config
    from enclaveml.attestation import create_ratls_certificate
    from enclaveml.kms import KeyBrokerClient
    from enclaveml.serving import RedisStreamsQueue
    from enclaveml.serving._engine import threads_per_instance
    from enclaveml.serving.app import create_app
    from enclaveml.serving.secure import load_sealed_models

    keep_freed_memory()  # every request allocates image-sized buffers: see enclaveml._memory
    with KeyBrokerClient(kbs, provider, verify=str(kbs_ca) if kbs_ca else True) as broker:
        # A front end in queue mode only needs the models' signatures, not compute threads.
        compute = 1 if queue_url else threads_per_instance(options["instances"], threads)
        repository = load_sealed_models(models, broker, intra_op_threads=compute)
        queue = RedisStreamsQueue(queue_url, cluster_key=broker.release(cluster_key)) if queue_url else None
    host, port, (dns_names, ip_addresses) = listen
    ratls = create_ratls_certificate(provider, dns_names=dns_names, ip_addresses=ip_addresses)
    app = create_app(repository, attestation=attestation_hook(provider, ratls), queue=queue, **options)
    mode = f"queue {queue_url}" if queue_url else "in-process batching"
    err_console.print(
        f"serving {', '.join(sorted(models))} on https://{url_host(host)}:{port} (RA-TLS, {mode})"
    )
    with uvicorn_config(app, ratls, host=host, port=port) as config:
        settle_collector()  # the app is built: see enclaveml._collector
        uvicorn.Server(config).run()


def serve_worker(
    model: ModelSpecs,
    queue: Annotated[str, typer.Option(help="redis://... the front ends use.")],
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    tee: Tee = "auto",
    cluster_key: ClusterKey = "enclaveml-cluster",
    max_batch_size: BatchSize = 16,
    max_delay_ms: BatchDelay = 2.0,
    instances: Instances = 1,
    threads: Threads = None,
    print_measurement: PrintMeasurement = False,
) -> None:
    """A scale-out worker: attest, obtain model and cluster keys, serve requests from the queue."""
    import asyncio
    import signal

    try:
        models = _parse_models(model)
        provider = _provider(tee, "enclaveml serve-worker", {"models": sorted(models)}, print_measurement)
        if print_measurement:
            return
        if not kbs:
            raise ConfigurationError("--kbs URL (or ENCLAVEML_KBS_URL) is required")
        from enclaveml._collector import settle_collector
        from enclaveml._memory import keep_freed_memory
        from enclaveml.kms import KeyBrokerClient
        from enclaveml.serving import QueueWorker, RedisStreamsQueue
        from enclaveml.serving._engine import threads_per_instance
        from enclaveml.serving.secure import load_sealed_models

        keep_freed_memory()  # every request allocates image-sized buffers: see enclaveml._memory
        with KeyBrokerClient(kbs, provider, verify=str(kbs_ca) if kbs_ca else True) as broker:
            compute = threads_per_instance(instances, threads)
            repository = load_sealed_models(models, broker, intra_op_threads=compute)
            key = broker.release(cluster_key)
        settle_collector()  # the models are loaded: see enclaveml._collector

        async def run() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            async with RedisStreamsQueue(queue, cluster_key=key) as redis_queue:
                err_console.print(f"worker serving {', '.join(sorted(models))} from {queue}")
                worker = QueueWorker(
                    repository,
                    redis_queue,
                    max_batch_size=max_batch_size,
                    max_delay_ms=max_delay_ms,
                    instances=instances,
                )
                await worker.run(stop)

        asyncio.run(run())
    except EnclaveMLError as exc:
        err_console.print(f"[bold red]serve-worker failed:[/bold red] {exc}")
        raise typer.Exit(_exit_code(exc)) from None


def predict(
    url: Annotated[str, typer.Argument(help="https://host:port of the inference server.")],
    model: Annotated[str, typer.Argument(help="Model name.")],
    inputs: Annotated[
        Path, typer.Option("--input", help=".npy (single-input model) or .npz (one array per input).")
    ],
    policy: Annotated[Path, typer.Option(help="Appraisal policy the server must satisfy (TOML/JSON).")],
    output: Annotated[Path | None, typer.Option(help="Write the outputs to this .npz.")] = None,
    collateral: Annotated[Path | None, typer.Option(help="DCAP collateral file/dir.")] = None,
    pccs: Annotated[str | None, typer.Option(help="PCCS / Intel PCS URL.")] = None,
    vcek: Annotated[Path | None, typer.Option(help="SEV-SNP VCEK certificate.")] = None,
    simulation_key: Annotated[
        Path | None, typer.Option(help="Simulation key PEM: accept SIMULATED servers (unsafe).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Verify the server, then send INPUT to MODEL and print (or save) the outputs."""
    from enclaveml.attestation import load_policy
    from enclaveml.cli._verifiers import build_verifier
    from enclaveml.serving.client import Client

    try:
        arrays = _load_inputs(inputs)
        verifier = build_verifier(collateral=collateral, pccs=pccs, vcek=vcek, simulation_key=simulation_key)
        with Client(url, policy=load_policy(policy), verifier=verifier) as client:
            result = client.infer(model, arrays)
            claims = client.claims.to_dict()
    except EnclaveMLError as exc:
        err_console.print(f"[bold red]predict failed:[/bold red] {exc}")
        raise typer.Exit(_exit_code(exc)) from None
    if output is not None:
        np.savez(output, **result)  # type: ignore[arg-type]
    summary = {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in result.items()}
    if as_json:
        payload = {
            "claims": claims,
            "outputs": {n: a.tolist() for n, a in result.items()} if output is None else summary,
        }
        console.print_json(json.dumps(payload))
        return
    console.print(f"server verified: {claims['tee']} measurement {claims['measurement']}")
    for name, array in result.items():
        console.print(
            f"{name} {summary[name]}: {array if array.size <= 64 else '(saved)' if output else array}"
        )


def _load_inputs(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read inputs {path}: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {name: loaded[name] for name in loaded.files}
