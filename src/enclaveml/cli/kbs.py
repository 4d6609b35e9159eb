"""`enclaveml kbs`: run the key broker, bootstrap tokens, manage keys and policies, check the audit log.

Exit codes: 0 done; 1 the broker refused (denied, unauthorized, unknown or disabled key, audit
chain broken); 2 the request failed (broker unreachable, storage or crypto failure);
3 bad arguments, files or settings. The broker URL, admin token and pinned CA come from
``--url/--token/--ca`` or ``ENCLAVEML_KBS_URL``, ``ENCLAVEML_KBS_TOKEN``, ``ENCLAVEML_KBS_CA``.

Heavy modules (the FastAPI server, uvicorn, storage) load only inside the commands that use
them, so ``enclaveml --help`` stays fast and never imports the simulation backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from enclaveml._urls import url_host
from enclaveml.attestation.policy import load_policy
from enclaveml.cli._console import console, err_console
from enclaveml.cli._options import Host
from enclaveml.errors import (
    AuthorizationError,
    ConfigurationError,
    EnclaveMLError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
)

if TYPE_CHECKING:
    from enclaveml.kms._storage import SqliteKeyStore

app = typer.Typer(help="The key broker: serve, tokens, keys, policies, audit log.", no_args_is_help=True)
key_app = typer.Typer(help="Create, rotate, disable, enable, delete and list keys.", no_args_is_help=True)
policy_app = typer.Typer(help="Set a key's release policy.", no_args_is_help=True)
token_app = typer.Typer(help="Admin tokens (local bootstrap on the broker database).", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(key_app, name="key")
app.add_typer(policy_app, name="policy")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")

EXIT_REFUSED, EXIT_FAILED, EXIT_USAGE = 1, 2, 3
T = TypeVar("T")

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="ENCLAVEML_KBS_URL", help="Broker base URL (https://...).")
]
TokenOpt = Annotated[
    str, typer.Option("--token", envvar="ENCLAVEML_KBS_TOKEN", help="Admin bearer token.", show_default=False)
]
CaOpt = Annotated[
    Path | None,
    typer.Option("--ca", envvar="ENCLAVEML_KBS_CA", help="Broker certificate or CA file to pin (PEM)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def exit_code(exc: EnclaveMLError) -> int:
    """The CLI exit code for an enclaveml error (see the module docstring)."""
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, KeyReleaseDeniedError | AuthorizationError | KeyNotFoundError | KeyDisabledError):
        return EXIT_REFUSED
    return EXIT_FAILED


def fail(exc: EnclaveMLError, as_json: bool) -> NoReturn:
    """Report ``exc`` (its text never holds key material) and exit with its code."""
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, KeyReleaseDeniedError):
        error.update(rule=exc.rule, observed=exc.observed, expected=exc.expected)
    if as_json:
        console.print_json(json.dumps({"error": error}))
    else:
        # Server text may hold "[...]" (policy lists): escaped, so rich does not read it as markup.
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
    raise typer.Exit(exit_code(exc))


@contextmanager
def reporting(as_json: bool) -> Iterator[None]:
    """Turn enclaveml errors raised inside the block into a message and an exit code."""
    try:
        yield
    except EnclaveMLError as exc:
        fail(exc, as_json)


def ca_of(ca: Path | None) -> str | bool:
    return str(ca) if ca is not None else True


def require_url(url: str) -> str:
    if not url:
        raise ConfigurationError("no broker URL: pass --url or set ENCLAVEML_KBS_URL")
    return url


def _admin_call(url: str, token: str, ca: Path | None, as_json: bool, call: Callable[[Any], T]) -> T:
    from enclaveml.kms.admin import KeyBrokerAdmin

    with reporting(as_json), KeyBrokerAdmin(require_url(url), token, verify=ca_of(ca)) as admin:
        return call(admin)
    raise AssertionError("unreachable")  # pragma: no cover - reporting() always exits on error


def _done(as_json: bool, result: dict[str, Any], message: str) -> None:
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(message, markup=False)


# -- keys -------------------------------------------------------------------------------------------


@key_app.command("create")
def key_create(
    key_id: Annotated[str, typer.Argument(help="Name of the new key.")],
    policy: Annotated[Path, typer.Option(help="Release policy file (TOML or JSON).")],
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create KEY_ID (version 1) with a release policy."""
    with reporting(as_json):
        loaded = load_policy(policy)
    version = _admin_call(url, token, ca, as_json, lambda a: a.create_key(key_id, loaded))
    _done(as_json, {"key_id": key_id, "version": version}, f"created key {key_id!r} version {version}")


@key_app.command("rotate")
def key_rotate(
    key_id: str, url: UrlOpt = "", token: TokenOpt = "", ca: CaOpt = None, as_json: JsonOpt = False
) -> None:
    """Add a version to KEY_ID; new seals use it, older versions still unseal (until `key min-version`)."""
    version = _admin_call(url, token, ca, as_json, lambda a: a.rotate_key(key_id))
    _done(as_json, {"key_id": key_id, "version": version}, f"key {key_id!r} is now at version {version}")


@key_app.command("disable")
def key_disable(
    key_id: str, url: UrlOpt = "", token: TokenOpt = "", ca: CaOpt = None, as_json: JsonOpt = False
) -> None:
    """Stop every wrap and release of KEY_ID."""
    _admin_call(url, token, ca, as_json, lambda a: a.disable_key(key_id))
    _done(as_json, {"key_id": key_id, "state": "disabled"}, f"key {key_id!r} disabled")


@key_app.command("enable")
def key_enable(
    key_id: str, url: UrlOpt = "", token: TokenOpt = "", ca: CaOpt = None, as_json: JsonOpt = False
) -> None:
    """Allow wraps and releases of KEY_ID again."""
    _admin_call(url, token, ca, as_json, lambda a: a.enable_key(key_id))
    _done(as_json, {"key_id": key_id, "state": "enabled"}, f"key {key_id!r} enabled")


@key_app.command("min-version")
def key_min_version(
    key_id: Annotated[str, typer.Argument(help="The key.")],
    version: Annotated[int, typer.Argument(help="The oldest version to release from now on.", min=1)],
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Release only versions >= VERSION of KEY_ID: artifacts sealed under older ones stop unsealing.

    After sealing a new model under a rotated key, this stops any server from unsealing the older
    artifacts the host may still hold (rollback). Versions stay stored; a lower VERSION undoes it.
    """
    _admin_call(url, token, ca, as_json, lambda a: a.set_min_version(key_id, version))
    _done(
        as_json,
        {"key_id": key_id, "min_version": version},
        f"key {key_id!r} releases versions >= {version} only",
    )


@key_app.command("delete")
def key_delete(
    key_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: everything sealed under it is lost.")] = False,
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Destroy every version of KEY_ID (artifacts sealed under it become unrecoverable)."""
    if not yes:
        fail(ConfigurationError(f"deleting {key_id!r} destroys every version; repeat with --yes"), as_json)
    _admin_call(url, token, ca, as_json, lambda a: a.delete_key(key_id))
    _done(as_json, {"key_id": key_id, "deleted": True}, f"key {key_id!r} deleted")


@key_app.command("list")
def key_list(url: UrlOpt = "", token: TokenOpt = "", ca: CaOpt = None, as_json: JsonOpt = False) -> None:
    """List keys, their versions, state and policy."""
    keys = _admin_call(url, token, ca, as_json, lambda a: a.list_keys())
    if as_json:
        rows = [
            {"key_id": k.key_id, "versions": list(k.versions), "latest": k.latest,
             "min_version": k.min_version, "state": k.state, "policy": k.policy}
            for k in keys
        ]  # fmt: skip
        console.print_json(json.dumps({"keys": rows}))
        return
    table = Table(title="Keys", header_style="bold")
    for column in ("key", "versions", "latest", "released from", "state", "policy"):
        table.add_column(column, overflow="fold")
    for k in keys:
        policy = json.dumps(k.policy, sort_keys=True)
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    k.key_id,
                    ",".join(map(str, k.versions)),
                    str(k.latest),
                    str(k.min_version),
                    k.state,
                    policy,
                )
            )
        )
    console.print(table)


@policy_app.command("set")
def policy_set(
    key_id: Annotated[str, typer.Argument(help="Key whose release policy to replace.")],
    policy: Annotated[Path, typer.Argument(help="Policy file (TOML or JSON).")],
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace KEY_ID's release policy with the one in POLICY."""
    with reporting(as_json):
        loaded = load_policy(policy)
    _admin_call(url, token, ca, as_json, lambda a: a.set_policy(key_id, loaded))
    _done(as_json, {"key_id": key_id, "policy": loaded.to_dict()}, f"policy of {key_id!r} replaced")


# -- audit ------------------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    db: Annotated[Path | None, typer.Option(help="Check this broker database file offline.")] = None,
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the audit log's hash chain offline (--db) and/or at the broker (--url); exit 1 if broken."""
    verdicts: dict[str, dict[str, Any]] = {}
    with reporting(as_json):
        if db is None and not url:
            raise ConfigurationError("give --db FILE (offline) and/or --url (the running broker)")
        if db is not None:
            verdicts["db"] = _offline_audit(db)
        if url:
            online = _admin_call(url, token, ca, as_json, lambda a: a.verify_audit())
            verdicts["broker"] = {"ok": online.ok, "records": online.records, "first_bad": online.first_bad}
    ok = all(v["ok"] for v in verdicts.values())
    if as_json:
        console.print_json(json.dumps({"ok": ok, **verdicts}))
    else:
        for where, v in verdicts.items():
            state = (
                "[green]intact[/green]" if v["ok"] else f"[bold red]BROKEN at seq {v['first_bad']}[/bold red]"
            )
            console.print(f"audit log ({where}): {v['records']} records, {state}")
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


def _offline_audit(db: Path) -> dict[str, Any]:
    with _local_store(db) as store:
        verdict = store.verify_audit()
    return {"ok": verdict.ok, "records": verdict.records, "first_bad": verdict.first_bad}


# -- local bootstrap: root key and tokens -----------------------------------------------------------


@token_app.command("create")
def token_create(
    db: Annotated[Path, typer.Option(help="The broker database (created if missing).")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="Scope to grant (repeat): keys:read, keys:write, ...")
    ],
    name: Annotated[str, typer.Option(help="A name for the token (audit and revocation).")] = "admin",
    as_json: JsonOpt = False,
) -> None:
    """Create an admin token directly in the database (run on the broker host); it is shown once."""
    from enclaveml.kms._tokens import TokenAuthority

    with reporting(as_json), _local_store(db, create=True) as store:
        secret = TokenAuthority(store).create_token(name, scope, actor="cli")
    if as_json:
        console.print_json(json.dumps({"name": name, "scopes": sorted(scope), "token": secret}))
        return
    err_console.print(f"token {name!r} ({', '.join(sorted(scope))}); it is shown only now:", markup=False)
    console.print(secret, markup=False, highlight=False, soft_wrap=True)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see `token list`).")],
    db: Annotated[Path, typer.Option(help="The broker database.")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an admin token in the database (run on the broker host); a running broker refuses it
    from its next request on. The name stays taken, so audit records keep meaning one token."""
    from enclaveml.kms._tokens import TokenAuthority

    with reporting(as_json), _local_store(db) as store:
        TokenAuthority(store).revoke_token(name, actor="cli")
    if as_json:
        console.print_json(json.dumps({"name": name, "revoked": True}))
        return
    err_console.print(f"token {name!r} revoked", markup=False)


@token_app.command("list")
def token_list(
    db: Annotated[Path, typer.Option(help="The broker database.")], as_json: JsonOpt = False
) -> None:
    """The admin tokens in the database: names, scopes, whether revoked (never the secrets)."""
    from enclaveml.kms._tokens import TokenAuthority

    with reporting(as_json), _local_store(db) as store:
        tokens = TokenAuthority(store).list_tokens()
    if as_json:
        rows = [{"name": t.name, "scopes": sorted(t.scopes), "revoked": t.revoked} for t in tokens]
        console.print_json(json.dumps({"tokens": rows}))
        return
    for t in tokens:
        state = "revoked" if t.revoked else "active"
        console.print(f"{t.name}\t{state}\t{', '.join(sorted(t.scopes))}", markup=False, highlight=False)


@contextmanager
def _local_store(db: Path, *, create: bool = False) -> Iterator[SqliteKeyStore]:
    """The broker database opened directly (on the broker host), closed afterwards."""
    from enclaveml.kms._storage import SqliteKeyStore

    # SqliteKeyStore creates a missing database: a mistyped path must not look like "no tokens".
    if not create and not db.is_file():
        raise ConfigurationError(f"no broker database at {db}")
    store = SqliteKeyStore(db)
    try:
        yield store
    finally:
        store.close()


root_key_app = typer.Typer(help="The broker's root key file.", no_args_is_help=True)
app.add_typer(root_key_app, name="root-key")


@root_key_app.command("create")
def root_key_create(
    path: Annotated[Path, typer.Argument(help="Where to write the new root key (mode 0600).")],
    db: Annotated[Path | None, typer.Option(help="Refuse a path inside this database's directory.")] = None,
) -> None:
    """Create a new random root key file; keep it away from the database and its backups."""
    from enclaveml.kms._rootkey import generate_root_key_file

    with reporting(False):
        generate_root_key_file(path, database=db)
    err_console.print(
        f"wrote a new root key to {path}; losing it makes every broker key unrecoverable", markup=False
    )


# -- serve ------------------------------------------------------------------------------------------


@app.command("serve")
def serve(
    db: Annotated[Path, typer.Option(help="The broker database (created on first start).")],
    root_key: Annotated[
        Path | None,
        typer.Option(
            help="Root key file (mode 0600, not beside the database); default $ENCLAVEML_KBS_ROOT_KEY."
        ),
    ] = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8443,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) from your CA.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    cert_out: Annotated[
        Path | None,
        typer.Option(help="Without --tls-cert: where to write the self-signed certificate clients pin."),
    ] = None,
    simulation_key: Annotated[
        Path | None, typer.Option(help="Accept SIMULATION evidence signed by this key (unsafe, dev only).")
    ] = None,
    collateral: Annotated[Path | None, typer.Option(help="dcap-qvl collateral file or directory.")] = None,
    pccs: Annotated[str | None, typer.Option(help="PCCS or Intel PCS URL for DCAP collateral.")] = None,
    kem: Annotated[
        list[str] | None, typer.Option("--kem", help="Allowed release KEM (repeat); default: all.")
    ] = None,
    nonce_ttl: Annotated[float, typer.Option(help="Seconds a release challenge stays valid.")] = 60.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[int, typer.Option(help="Broker processes sharing the port and the database.")] = 1,
) -> None:
    """Run the key broker over HTTPS until interrupted."""
    import contextlib

    from enclaveml.attestation.tls import in_memory_key_files
    from enclaveml.kms._rootkey import load_root_key
    from enclaveml.kms._tlscert import self_signed_certificate
    from enclaveml.kms.server import BrokerConfig, run_broker

    with reporting(False):
        if (tls_cert is None) != (tls_key is None):
            raise ConfigurationError("give both --tls-cert and --tls-key, or neither (self-signed)")
        config_kwargs: dict[str, Any] = {"nonce_ttl": nonce_ttl}
        if kem:
            config_kwargs["allowed_kems"] = frozenset(kem)
        config = BrokerConfig(
            db_path=db,
            root_key=load_root_key(root_key, database=db),
            verifier=_broker_verifier(simulation_key, collateral, pccs),
            **config_kwargs,
        )
        with contextlib.ExitStack() as stack:
            certfile, keyfile = tls_cert, tls_key
            if certfile is None or keyfile is None:
                certfile = cert_out or db.resolve().parent / "kbs-cert.pem"
                names, ips = _certificate_names(host)
                made = self_signed_certificate(hostnames=names, ip_addresses=ips)
                made.write_certificate(certfile)
                # The self-signed key lives only in this process's memory (an anonymous memory
                # file for uvicorn to load), never on disk, however the process ends.
                _, memory_key = stack.enter_context(
                    in_memory_key_files(made.certificate_pem, made.private_key_pem)
                )
                keyfile = Path(memory_key)
                fingerprint = made.fingerprint
                err_console.print(
                    f"self-signed broker certificate: {certfile}\n  SHA-256 fingerprint: {fingerprint}\n"
                    f"  clients pin it with --ca {certfile} (or ENCLAVEML_KBS_CA)",
                    markup=False,
                    soft_wrap=True,
                )
            err_console.print(
                f"key broker listening on https://{url_host(host)}:{port}", markup=False, soft_wrap=True
            )
            run_broker(
                config, host, port, certfile=certfile, keyfile=keyfile, log_level=log_level, workers=workers
            )


def _broker_verifier(simulation_key: Path | None, collateral: Path | None, pccs: str | None) -> Any:
    """Hardware verifiers always (SEV-SNP; DCAP with collateral); simulation only when asked for."""
    from enclaveml.cli._verifiers import build_verifier

    verifier = build_verifier(collateral=collateral, pccs=pccs, simulation_key=simulation_key)
    if simulation_key is not None:
        err_console.print(
            "[bold red]This broker releases keys to SIMULATED workloads whose evidence anyone with "
            f"{simulation_key} can forge. Never load real keys into it.[/bold red]"
        )
    return verifier


def _certificate_names(host: str) -> tuple[list[str], list[str]]:
    import ipaddress

    names, ips = ["localhost"], ["127.0.0.1", "::1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host not in names:
            names.append(host)
        return names, ips
    if not address.is_unspecified and str(address) not in ips:
        ips.append(str(address))
    return names, ips
