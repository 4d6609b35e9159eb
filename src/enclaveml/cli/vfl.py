"""`enclaveml vfl`: vertical federated learning — plan a job, run its server in a TEE, take part as a party.

``plan`` writes the job plan every party checks (task, parties with the label party first,
algorithm and hyperparameters); ``enrol`` issues party credentials (the server keeps hashes);
``server`` runs the plan inside the TEE over RA-TLS and exits when the job is over; ``psi``,
``train`` and ``predict`` are the party's side: verify the server's code and plan, then answer its
calls with the party's own file. Exit codes as for ``enclaveml serve``: 1 refused (policy, plan,
key release), 2 failed, 3 bad arguments or files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from enclaveml._files import write_atomically
from enclaveml.cli._console import console, err_console
from enclaveml.cli._options import Host, HttpsPort, Kbs, KbsCa, PrintMeasurement, Tee
from enclaveml.cli.fl import _fail, _pairs, _read_json
from enclaveml.cli.serve import _provider
from enclaveml.errors import ConfigurationError, EnclaveMLError

app = typer.Typer(
    name="vfl", help="Vertical federated learning with the server in a TEE.", no_args_is_help=True
)

ENTRY_POINT = "enclaveml vfl server"
PARTY_ENTRY_POINT = "enclaveml vfl party {name}"
SERVER_MODEL_TYPE = "application/vnd.enclaveml.vfl.server-model+cbor"
PARTY_MODEL_TYPE = "application/vnd.enclaveml.vfl.party-model+cbor"

PlanOpt = Annotated[Path, typer.Option("--plan", help="Job plan JSON (from `enclaveml vfl plan`).")]
Url = Annotated[str, typer.Argument(help="https://host:port of the vertical-FL server.")]
Name = Annotated[str, typer.Option("--name", help="This party's name in the plan.")]
Data = Annotated[Path, typer.Option(help="This party's table: .csv, .parquet or .npy.")]
Credential = Annotated[Path, typer.Option(help="File holding this party's credential.")]
PolicyOpt = Annotated[Path, typer.Option(help="Appraisal policy the server must satisfy (TOML/JSON).")]
PartyTee = Annotated[str, typer.Option("--tee", help="This process's evidence provider (for key release).")]
SimKey = Annotated[Path | None, typer.Option(help="Simulation key PEM: accept a SIMULATED server (unsafe).")]
Wait = Annotated[float, typer.Option(help="Seconds to wait for an unreachable server.")]
Ignore = Annotated[list[str] | None, typer.Option(help="A column that is not a feature; repeatable.")]
Rows = Annotated[Path | None, typer.Option(help="Aligned rows from `enclaveml vfl psi`.")]
IdColumn = Annotated[str | None, typer.Option(help="ID column to leave out of the features.")]


def _plan(path: Path) -> Any:
    from enclaveml.fl.vertical.plan import VerticalPlan

    return VerticalPlan.from_dict(_read_json(path, "job plan"))


@app.command("plan")
def plan_command(
    task: Annotated[str, typer.Option(help="psi, train or predict.")],
    party: Annotated[list[str], typer.Option("--party", help="Party name; repeat; the label party first.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    psi_mode: Annotated[str, typer.Option(help="PSI: tee (keyed hashes to the TEE) or ecdh.")] = "tee",
    algorithm: Annotated[str | None, typer.Option(help="train/predict: boosting or logreg.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Hyperparameter NAME=JSON; repeatable.")] = None,
    model: Annotated[
        Path | None, typer.Option(help="predict (boosting): the server's sealed model, to pin its digest.")
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="predict: the dataset name the parties give their rows.")
    ] = "test",
    valid_dataset: Annotated[
        str | None, typer.Option(help="train (boosting): early stopping on the parties' validation rows.")
    ] = None,
    call_timeout: Annotated[float, typer.Option(help="Seconds the server waits for one answer.")] = 600.0,
    credentials: Annotated[
        Path | None,
        typer.Option(help="Party registry from `enclaveml vfl enrol`: pins each party's credential."),
    ] = None,
    psi_max_ids: Annotated[
        int | None,
        typer.Option(help="PSI: the most IDs a party may hold (bounds what a relay can test in ecdh mode)."),
    ] = None,
) -> None:
    """Write a job plan: every party uses the same file, so every party checks the same job."""
    from enclaveml.cli._credentials import read_registry
    from enclaveml.crypto import read_header
    from enclaveml.fl.vertical.plan import VerticalPlan

    try:
        pinned = read_registry(credentials, "parties") if credentials is not None else {}
        if credentials is not None:
            pinned = {p: h for p, h in pinned.items() if p in party}  # the registry may serve several jobs
            if set(pinned) != set(party):
                raise ConfigurationError(
                    f"{credentials} has no credential for {sorted(set(party) - set(pinned))}"
                )
        model_sha256 = None
        if model is not None:
            model_sha256 = dict(read_header(model).metadata).get("model_sha256")
            if model_sha256 is None:
                raise ConfigurationError(f"{model} is not a sealed vertical-FL server model")
        plan = VerticalPlan(
            task=task,
            parties=tuple(party),
            psi_mode=psi_mode,
            algorithm=algorithm,
            params=_pairs(param or []),
            model_sha256=model_sha256,
            dataset=dataset,
            valid_dataset=valid_dataset,
            call_timeout_s=call_timeout,
            credentials=pinned,
            psi_max_ids=psi_max_ids,
        )
        output.write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    except EnclaveMLError as exc:
        raise _fail("plan", exc) from None
    console.print(f"plan {plan.digest.hex()} written to {output}")
    if not pinned:
        err_console.print(
            "[yellow]the plan pins no party credentials: whoever controls the server's --parties file "
            "decides who speaks for each party (see --credentials)[/yellow]"
        )


@app.command("enrol")
def enrol(
    registry: Annotated[Path, typer.Argument(help="Party registry JSON for the server (hashes only).")],
    parties: Annotated[list[str], typer.Argument(help="Party names to (re-)enrol.")],
) -> None:
    """Issue fresh credentials; the registry keeps SHA-256 hashes, the credentials are printed once."""
    from enclaveml.cli._credentials import issue_credentials

    try:
        issued = issue_credentials(registry, "parties", parties)
    except EnclaveMLError as exc:
        raise _fail("enrol", exc) from None
    console.print_json(json.dumps(issued))


_TELL_GRACE_S = 30.0


@app.command("server")
def server(
    plan: PlanOpt,
    parties: Annotated[Path | None, typer.Option(help="Party registry from `enclaveml vfl enrol`.")] = None,
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    model_key: Annotated[
        str, typer.Option(help="Broker key id sealing the server's model part.")
    ] = "vfl-model",
    model_out: Annotated[
        Path | None, typer.Option(help="train (boosting): write the sealed server model.")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="predict (boosting): the sealed server model.")] = None,
    tee: Tee = "auto",
    host: Host = "127.0.0.1",
    port: HttpsPort = 8443,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every party to connect.")
    ] = 600.0,
    print_measurement: PrintMeasurement = False,
) -> None:
    """Run the job of PLAN over RA-TLS; exits when it is over (0 succeeded, 2 failed)."""
    from enclaveml.fl.vertical import jobs
    from enclaveml.fl.vertical._session import VerticalSession
    from enclaveml.fl.vertical.server import serve_vertical

    try:
        expected = _plan(plan)
        provider = _provider(tee, ENTRY_POINT, expected.to_dict(), print_measurement)
        if print_measurement:
            return
        if expected.task == "train" and expected.algorithm == "boosting" and model_out is None:
            # Checked now, not after training: the parties would seal parts of a model that is lost.
            raise ConfigurationError(
                "boosting training needs --model-out (and --kbs): the server's part is sealed"
            )
        hashes = _party_hashes(expected, parties)
        broker = _broker(kbs, kbs_ca, provider) if (model is not None or model_out is not None) else None
        server_model = _unseal_server_model(model, broker, expected.model_sha256) if model else None
        session = VerticalSession(
            expected,
            {p: hashes.get(p, b"") for p in expected.parties},
            jobs.server_job(expected, server_model=server_model),
            connect_timeout_s=connect_timeout,
        )
        running = serve_vertical(session, provider, host=host, port=port)
        err_console.print(f"vertical job {expected.task} ({expected.digest.hex()[:16]}…) on {running.url}")
        try:
            session.wait()
            session.wait_told(_TELL_GRACE_S)  # every party's last poll gets the outcome
        finally:
            running.stop(timeout=5.0)
        if session.state != "succeeded":
            err_console.print(f"[bold red]job failed:[/bold red] {session.outcome().get('error')}")
            raise typer.Exit(2)
        _report(session.result, broker, model_key, model_out)
    except EnclaveMLError as exc:
        raise _fail("vfl server", exc) from None


def _party_hashes(plan: Any, registry: Path | None) -> dict[str, bytes]:
    """Each party's credential hash: the plan's pins, or (a plan without them) the --parties file."""
    from enclaveml.cli._credentials import read_registry

    pinned = {p: bytes.fromhex(h) for p, h in plan.credentials.items()}
    if registry is None and not pinned:
        raise ConfigurationError("--parties (the registry from `enclaveml vfl enrol`) is required")
    if registry is None:
        return pinned
    hashes = {p: bytes.fromhex(h) for p, h in read_registry(registry, "parties").items()}
    if pinned and any(hashes.get(p) != h for p, h in pinned.items()):
        raise ConfigurationError(f"{registry} differs from the party credentials the plan names")
    if not pinned:
        err_console.print(
            f"[yellow]the plan pins no party credentials: taking them from {registry}, a file this host "
            "controls[/yellow]"
        )
    return hashes


def _broker(kbs: str, kbs_ca: Path | None, provider: Any) -> Any:
    if not kbs:
        raise ConfigurationError("models are sealed under broker keys: give --kbs")
    from enclaveml.kms import KeyBrokerClient

    return KeyBrokerClient(kbs, provider, verify=str(kbs_ca) if kbs_ca else True)


def _unseal_server_model(path: Path, broker: Any, expected_sha256: str | None) -> bytes:
    from enclaveml.crypto import unseal_file_to_bytes

    data = unseal_file_to_bytes(path, unwrapper=broker)
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ConfigurationError(f"{path} is not the model the plan pins (model_sha256)")
    return data


def _report(result: Any, broker: Any, model_key: str, model_out: Path | None) -> None:
    if result.psi is not None:
        sizes = ", ".join(f"{p}: {n}" for p, n in zip(result.psi.parties, result.psi.set_sizes, strict=True))
        console.print(f"PSI ({result.psi.mode}) intersection: {result.psi.intersection_size} rows ({sizes})")
    if result.predicted_rows is not None:
        console.print(f"{result.predicted_rows} predictions delivered to the label party")
    if result.server_model is not None:
        if model_out is None:
            raise ConfigurationError(
                "the trained server model needs --model-out (it is sealed, never kept plain)"
            )
        _seal(result.server_model, broker, model_key, model_out, SERVER_MODEL_TYPE)
        console.print(f"server model sealed to {model_out}")
    elif result.training is not None:
        console.print("training finished; each party holds its part of the model")


def _seal(data: bytes, broker: Any, key_id: str, output: Path, content_type: str, **metadata: str) -> None:
    from enclaveml._files import write_atomically
    from enclaveml.crypto import seal_bytes

    handle = broker.release(key_id)
    digest = hashlib.sha256(data).hexdigest()
    sealed = seal_bytes(data, wrapper=handle, key_id=key_id, content_type=content_type,
                        metadata={"model_sha256": digest, **metadata})  # fmt: skip
    write_atomically(output, sealed)  # a crash never leaves half an artifact under its name


def _connect(
    url: str, plan: Path, credential_file: Path, policy: Path, simulation_key: Path | None, wait: float
) -> Any:
    from enclaveml.attestation import load_policy
    from enclaveml.cli._verifiers import build_verifier, read_file
    from enclaveml.fl.vertical.party import ServerConnection

    credential = read_file(credential_file, "credential").decode().strip()
    verifier = build_verifier(simulation_key=simulation_key)
    connection = ServerConnection(
        url,
        credential=credential,
        policy=load_policy(policy),
        verifier=verifier,
        expected_plan=_plan(plan),
        wait_for_server_s=wait,
    )
    err_console.print(f"server verified (code and plan {connection.plan.digest.hex()[:16]}…)")
    return connection


def _serve_party(
    endpoint: Any,
    url: str,
    plan: Path,
    credential_file: Path,
    policy: Path,
    simulation_key: Path | None,
    wait: float,
) -> None:
    """Verify the server (code and plan), answer its calls with ``endpoint``; exit 2 if the job failed."""
    with _connect(url, plan, credential_file, policy, simulation_key, wait) as connection:
        outcome = connection.serve(endpoint)
    if not outcome.succeeded:
        err_console.print(f"[bold red]job failed:[/bold red] {outcome.error}")
        raise typer.Exit(2)


def _party_broker(name: str, tee: str, kbs: str, kbs_ca: Path | None) -> Any:
    """The party's key-broker client, attesting as ``PARTY_ENTRY_POINT`` (the simulated measurement
    a broker key's policy admits for this party's client code)."""
    return _broker(kbs, kbs_ca, _provider(tee, PARTY_ENTRY_POINT.format(name=name), {}, False))


@app.command("psi")
def psi(
    url: Url,
    plan: PlanOpt,
    name: Name,
    data: Data,
    id_column: Annotated[str, typer.Option(help="Column holding the IDs.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the aligned rows (.npy).")],
    credential_file: Credential,
    policy: PolicyOpt,
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    psi_key: Annotated[str, typer.Option(help="TEE mode: broker key id of the PSI key.")] = "vfl-psi",
    tee: PartyTee = "auto",
    simulation_key: SimKey = None,
    wait: Wait = 120.0,
) -> None:
    """Align this party's rows with the others': writes the positions of the common rows, in common order."""
    from enclaveml.cli._tables import read_table
    from enclaveml.fl.vertical.psi import PsiParty

    try:
        expected = _plan(plan)
        _check_party(expected, name, "psi")
        table = read_table(data, id_column=id_column)
        key = None
        if expected.psi_mode == "tee":
            key = _party_broker(name, tee, kbs, kbs_ca).release(psi_key)
        endpoint = PsiParty(
            name, table.ids or [], key=key, parties=len(expected.parties), max_ids=expected.psi_max_ids
        )
        _serve_party(endpoint, url, plan, credential_file, policy, simulation_key, wait)
        written = _save_private(output, np.asarray(endpoint.aligned_rows, dtype=np.int64))
    except EnclaveMLError as exc:
        raise _fail("vfl psi", exc) from None
    console.print(f"{endpoint.intersection_size} aligned rows written to {written}")


def _save_private(output: Path, array: np.ndarray) -> Path:
    """``np.save``'s file (``.npy`` appended where missing), written atomically with mode 0600.

    The rows a party aligned and the predictions (computed from every party's features) are its
    own results, not for other users of the machine; a failed write leaves no partial file.
    """
    path = output if output.suffix == ".npy" else output.with_name(output.name + ".npy")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _check_party(plan: Any, name: str, task: str) -> None:
    if plan.task != task:
        raise ConfigurationError(f"this plan is for the task {plan.task!r}; use `enclaveml vfl {plan.task}`")
    if name not in plan.parties:
        raise ConfigurationError(f"{name!r} is not a party of this plan ({', '.join(plan.parties)})")


@app.command("train")
def train(
    url: Url,
    plan: PlanOpt,
    name: Name,
    data: Data,
    credential_file: Credential,
    policy: PolicyOpt,
    model_out: Annotated[Path, typer.Option(help="Where to write this party's sealed model part.")],
    rows: Rows = None,
    id_column: IdColumn = None,
    label_column: Annotated[str | None, typer.Option(help="The label party: the label column.")] = None,
    ignore_column: Ignore = None,
    valid_data: Annotated[
        Path | None, typer.Option(help="Boosting with a valid_dataset: this party's validation table.")
    ] = None,
    valid_rows: Annotated[Path | None, typer.Option(help="Aligned rows of the validation table.")] = None,
    model_key: Annotated[str, typer.Option(help="Broker key id sealing this party's model part.")] = "",
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    tee: PartyTee = "auto",
    simulation_key: SimKey = None,
    wait: Wait = 120.0,
) -> None:
    """Train the plan's model on this party's aligned rows; seals this party's part of the model."""
    from enclaveml.cli._tables import read_rows, read_table
    from enclaveml.fl.vertical.jobs import party_for_training

    try:
        expected = _plan(plan)
        _check_party(expected, name, "train")
        if (name == expected.label_party) != (label_column is not None):
            raise ConfigurationError(
                "--label-column is given by the label party (the plan's first) and only by it"
            )
        columns: dict[str, Any] = {
            "id_column": id_column,
            "label_column": label_column,
            "ignore": ignore_column or [],
        }
        table = read_table(data, **columns).take(read_rows(rows))
        valid = None
        if valid_data is not None:
            held_out = read_table(valid_data, **columns).take(read_rows(valid_rows))
            valid = (held_out.features, held_out.labels)
        with _party_broker(name, tee, kbs, kbs_ca) as broker:
            endpoint, part = party_for_training(expected, name, table.features, table.labels, valid=valid)
            _serve_party(endpoint, url, plan, credential_file, policy, simulation_key, wait)
            _seal(part(), broker, model_key or f"vfl-{name}", model_out, PARTY_MODEL_TYPE, party=name)
    except EnclaveMLError as exc:
        raise _fail("vfl train", exc) from None
    console.print(f"model part of {name} sealed to {model_out}")


@app.command("predict")
def predict(
    url: Url,
    plan: PlanOpt,
    name: Name,
    data: Data,
    credential_file: Credential,
    policy: PolicyOpt,
    model: Annotated[Path, typer.Option(help="This party's sealed model part (from `vfl train`).")],
    rows: Rows = None,
    id_column: IdColumn = None,
    output: Annotated[
        Path | None, typer.Option(help="The label party: where to write the predictions (.npy).")
    ] = None,
    ignore_column: Ignore = None,
    kbs: Kbs = "",
    kbs_ca: KbsCa = None,
    tee: PartyTee = "auto",
    simulation_key: SimKey = None,
    wait: Wait = 120.0,
) -> None:
    """Predict the plan's dataset jointly; the label party receives the predictions."""
    from enclaveml.cli._tables import read_rows, read_table
    from enclaveml.crypto.sealed import unseal_file_with_header
    from enclaveml.fl.vertical.jobs import PredictionSink, party_for_prediction

    try:
        expected = _plan(plan)
        _check_party(expected, name, "predict")
        is_label = name == expected.label_party
        if is_label != (output is not None):
            raise ConfigurationError("--output is given by the label party (the plan's first) and only by it")
        table = read_table(data, id_column=id_column, ignore=ignore_column or []).take(read_rows(rows))
        with _party_broker(name, tee, kbs, kbs_ca) as broker:  # its connection closes either way
            header, part = unseal_file_with_header(model, unwrapper=broker)
        # On the verified header: another party's part (or another kind of artifact) is refused.
        if header.content_type != PARTY_MODEL_TYPE or header.metadata.get("party") != name:
            raise ConfigurationError(
                f"{model} holds {header.content_type!r} of party {header.metadata.get('party')!r}, "
                f"not the model part of party {name!r}"
            )
        endpoint = party_for_prediction(expected, name, part, table.features)
        sink = PredictionSink(endpoint) if is_label else None
        _serve_party(endpoint, url, plan, credential_file, policy, simulation_key, wait)
        if sink is not None and output is not None:
            if sink.predictions is None:
                raise ConfigurationError("the job ended without predictions for this party")
            written = _save_private(output, sink.predictions)
            console.print(f"{sink.predictions.shape[0]} predictions written to {written}")
    except EnclaveMLError as exc:
        raise _fail("vfl predict", exc) from None
