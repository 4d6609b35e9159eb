"""`enclaveml fl`: federated learning — plan, enrol, run the aggregator in a TEE, take part as a client.

``plan`` writes the training plan all parties agree on; ``enrol`` issues client credentials and
keeps only their hashes in a registry file for the aggregator; ``aggregator`` runs the plan
inside the TEE over RA-TLS, sealing a checkpoint under a broker-released key after every
round and resuming from it on restart; ``client`` verifies the aggregator's code and plan
before it sends anything, then trains with a user-supplied function. Exit codes as for
``enclaveml serve``: 1 refused (policy, plan, key release), 2 failed, 3 bad arguments or files.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from enclaveml.cli._console import console, err_console
from enclaveml.cli._options import Host, HttpsPort, Kbs, KbsCa, PrintMeasurement, Tee
from enclaveml.cli.serve import _exit_code, _provider
from enclaveml.errors import ConfigurationError, EnclaveMLError

app = typer.Typer(name="fl", help="Federated learning with the aggregator in a TEE.", no_args_is_help=True)

ENTRY_POINT = "enclaveml fl aggregator"
PlanOpt = Annotated[Path, typer.Option("--plan", help="Training plan JSON (from `enclaveml fl plan`).")]


def _fail(what: str, exc: EnclaveMLError) -> typer.Exit:
    err_console.print(f"[bold red]{what} failed:[/bold red] {exc}")
    return typer.Exit(_exit_code(exc))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc}") from exc


def load_weights(path: Path) -> list[np.ndarray]:
    """Arrays from an ``.npz`` written by ``np.savez(path, *arrays)`` (``arr_0``, ``arr_1``, ... in order)."""
    try:
        with np.load(path, allow_pickle=False) as loaded:
            names = sorted(loaded.files, key=lambda n: int(n.removeprefix("arr_")))
            return [loaded[name] for name in names]
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path} is not an .npz of arrays arr_0, arr_1, ...: {exc}") from exc


@app.command("plan")
def plan_command(
    strategy: Annotated[str, typer.Option(help="Strategy name, e.g. fedavg.")],
    initial_weights: Annotated[Path, typer.Option(help=".npz of the initial weights (arr_0, arr_1, ...).")],
    rounds: Annotated[int, typer.Option(help="Number of rounds.")],
    min_clients: Annotated[int, typer.Option(help="Fewest accepted updates that make a round.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    option: Annotated[
        list[str] | None, typer.Option(help="Strategy parameter NAME=JSON; repeatable.")
    ] = None,
    validation: Annotated[
        list[str] | None, typer.Option(help="validate_updates NAME=JSON; repeatable.")
    ] = None,
    round_timeout: Annotated[float, typer.Option(help="Seconds a round waits for stragglers.")] = 600.0,
    model_id: Annotated[str, typer.Option(help="Name of the model architecture.")] = "model",
    participants: Annotated[
        Path | None,
        typer.Option(help="Client registry from `enclaveml fl enrol`: only these clients may take part."),
    ] = None,
) -> None:
    """Write a training plan: every party uses the same file, so every party checks the same rules."""
    from enclaveml.cli._credentials import read_registry
    from enclaveml.fl.plan import TrainingPlan

    try:
        pinned = read_registry(participants, "clients") if participants is not None else {}
        if participants is not None and not pinned:
            raise ConfigurationError(f"{participants} enrols no clients")
        built = _build_strategy(strategy, _pairs(option or []))
        plan = TrainingPlan.create(
            built,
            load_weights(initial_weights),
            rounds=rounds,
            min_clients=min_clients,
            round_timeout_s=round_timeout,
            model_id=model_id,
            validation=_pairs(validation or []),
            participants=pinned,
        )
        output.write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    except EnclaveMLError as exc:
        raise _fail("plan", exc) from None
    console.print(f"plan {plan.digest.hex()} written to {output}")
    if not pinned:
        err_console.print(
            "[yellow]the plan names no participants: whoever controls the aggregator's --clients file "
            "decides who takes part (see --participants)[/yellow]"
        )


def _build_strategy(name: str, options: dict[str, Any]) -> Any:
    """A strategy from its name and the options given (defaults for the rest, recorded in the plan)."""
    from enclaveml.fl.strategies import STRATEGIES, strategy_from_plan

    if name not in STRATEGIES:
        raise ConfigurationError(f"unknown strategy {name!r}: expected one of {sorted(STRATEGIES)}")
    if "inner" in options:  # wrappers (NormClipping, CentralDP) take the inner strategy's plan
        options["inner"] = strategy_from_plan(options["inner"])
    try:
        return STRATEGIES[name](**options)
    except TypeError as exc:
        raise ConfigurationError(f"strategy {name!r} does not take these options: {exc}") from exc


def _pairs(specs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"expected NAME=VALUE, got {spec!r}")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value  # a bare word is a string
    return out


@app.command("enrol")
def enrol(
    registry: Annotated[Path, typer.Argument(help="Client registry JSON for the aggregator (hashes only).")],
    client_ids: Annotated[list[str], typer.Argument(help="Client ids to (re-)enrol.")],
) -> None:
    """Issue fresh credentials; the registry keeps SHA-256 hashes, the credentials are printed once."""
    from enclaveml.cli._credentials import issue_credentials

    try:
        issued = issue_credentials(registry, "clients", client_ids)
    except EnclaveMLError as exc:
        raise _fail("enrol", exc) from None
    console.print_json(json.dumps(issued))


@app.command("aggregator")
def aggregator(
    plan: PlanOpt,
    initial_weights: Annotated[Path | None, typer.Option(help=".npz of the initial weights.")] = None,
    clients: Annotated[Path | None, typer.Option(help="Client registry from `enclaveml fl enrol`.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Directory for sealed checkpoints.")] = None,
    checkpoint_key: Annotated[str, typer.Option(help="Broker key id sealing checkpoints.")] = "fl-checkpoint",
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    tee: Tee = "auto",
    host: Host = "127.0.0.1",
    port: HttpsPort = 8443,
    print_measurement: PrintMeasurement = False,
) -> None:
    """Run the aggregator of PLAN over RA-TLS, resuming from the sealed checkpoint if there is one."""
    from enclaveml.fl.aggregator import Aggregator
    from enclaveml.fl.plan import TrainingPlan
    from enclaveml.fl.strategies import strategy_from_plan

    try:
        expected = TrainingPlan.from_dict(_read_json(plan, "training plan"))
        provider = _provider(tee, ENTRY_POINT, expected.to_dict(), print_measurement)
        if print_measurement:
            return
        if initial_weights is None:
            raise ConfigurationError("--initial-weights is required to run the aggregator")
        registry = _registry(expected, clients)
        store = _checkpoint_store(checkpoint_dir, checkpoint_key, kbs, kbs_ca, provider)
        core = Aggregator(
            strategy_from_plan(dict(expected.strategy)),
            load_weights(initial_weights),
            rounds=expected.rounds,
            min_clients=expected.min_clients,
            round_timeout_s=expected.round_timeout_s,
            model_id=expected.model_id,
            validation=dict(expected.validation),
            participants=dict(expected.participants),
            checkpoints=store,
        )
        if core.plan.digest != expected.digest:
            raise ConfigurationError("the initial weights or strategy do not reproduce the plan file")
        for client_id, digest in registry.items():
            core.enrol_hashed(client_id, bytes.fromhex(digest))
        _serve(core, provider, host, port)
    except EnclaveMLError as exc:
        raise _fail("aggregator", exc) from None


def _registry(plan: Any, clients: Path | None) -> dict[str, str]:
    """The clients to enrol: the plan's participants, or (a plan without them) the --clients file."""
    from enclaveml.cli._credentials import read_registry

    if plan.participants:
        if clients is not None and read_registry(clients, "clients") != dict(plan.participants):
            raise ConfigurationError(f"{clients} differs from the participants the plan names")
        return {}  # the aggregator enrols the plan's participants itself
    if clients is None:
        raise ConfigurationError("--clients is required: the plan names no participants")
    err_console.print(
        f"[yellow]the plan names no participants: enrolling the clients of {clients}, a file this "
        "host controls[/yellow]"
    )
    return read_registry(clients, "clients")


def _checkpoint_store(
    directory: Path | None, key_id: str, kbs: str, kbs_ca: Path | None, provider: Any
) -> Any:
    if directory is None:
        err_console.print("[yellow]no --checkpoint-dir: a restart begins the run again[/yellow]")
        return None
    if not kbs:
        raise ConfigurationError("--checkpoint-dir needs --kbs: checkpoints are sealed under a broker key")
    from enclaveml.fl._checkpoint import CheckpointStore
    from enclaveml.kms import KeyBrokerClient

    broker = KeyBrokerClient(kbs, provider, verify=str(kbs_ca) if kbs_ca else True)
    return CheckpointStore(directory, broker, key_id=key_id)


def _serve(core: Any, provider: Any, host: str, port: int) -> None:
    from enclaveml.fl.server import run_aggregator

    state = f"resuming after round {core.resumed_from}" if core.resumed_from else "starting at round 1"

    def ready(url: str) -> None:
        err_console.print(
            f"aggregating plan {core.plan.digest.hex()[:16]}… on {url} "
            f"({len(core.enrolled)} clients enrolled, {state})"
        )

    run_aggregator(core, provider, host=host, port=port, on_ready=ready)


@app.command("client")
def client(
    url: Annotated[str, typer.Argument(help="https://host:port of the aggregator.")],
    plan: PlanOpt,
    trainer: Annotated[str, typer.Option(help="module:function, train(weights, config) -> TrainResult.")],
    policy: Annotated[Path, typer.Option(help="Appraisal policy the aggregator must satisfy (TOML/JSON).")],
    credential_file: Annotated[Path, typer.Option(help="File holding this client's credential.")],
    output: Annotated[Path | None, typer.Option(help="Write the final global model to this .npz.")] = None,
    collateral: Annotated[Path | None, typer.Option(help="DCAP collateral file/dir.")] = None,
    pccs: Annotated[str | None, typer.Option(help="PCCS / Intel PCS URL.")] = None,
    vcek: Annotated[Path | None, typer.Option(help="SEV-SNP VCEK certificate.")] = None,
    simulation_key: Annotated[
        Path | None, typer.Option(help="Simulation key PEM: accept a SIMULATED aggregator (unsafe).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for an unreachable aggregator.")] = 120.0,
) -> None:
    """Verify the aggregator (code and plan), then train with TRAINER every round until the run ends."""
    from enclaveml.attestation import load_policy
    from enclaveml.cli._verifiers import build_verifier, read_file
    from enclaveml.fl.client import AggregatorClient, participate

    try:
        train = _import_trainer(trainer)
        credential = read_file(credential_file, "credential").decode().strip()
        verifier = build_verifier(collateral=collateral, pccs=pccs, vcek=vcek, simulation_key=simulation_key)
        expected = _read_json(plan, "training plan")
        with AggregatorClient(
            url,
            credential=credential,
            policy=load_policy(policy),
            verifier=verifier,
            expected_plan=expected,
            reconnect_s=wait,
            wait_for_aggregator_s=wait,
        ) as connection:
            err_console.print(f"aggregator verified; taking part as {connection.client_id}")
            final = participate(
                connection,
                train,
                on_round=lambda m: err_console.print(f"round {m.completed_rounds} aggregated"),
            )
    except EnclaveMLError as exc:
        raise _fail("client", exc) from None
    if output is not None:
        np.savez(output, *final.weights)
    console.print(f"training finished after {final.completed_rounds} rounds")


def _import_trainer(spec: str) -> Any:
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        raise ConfigurationError(f"--trainer takes module:function, got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot import trainer {spec!r}: {exc}") from exc
    if not callable(function):
        raise ConfigurationError(f"trainer {spec!r} is not callable")
    return function
