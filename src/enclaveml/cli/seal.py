"""`enclaveml seal` / `enclaveml unseal`: sealed files whose keys live in the key broker.

``seal`` runs at the data owner: the broker wraps a fresh data key under the latest version
of ``--key`` (admin token, scope ``keys:wrap``), so the owner never holds the KEK. ``unseal``
runs inside the attested workload: it releases the KEK version named in the file's header
through attestation (``--tee``) and writes the plaintext to the one path given as
``--output`` and nowhere else: nothing on stdout, and the 0600 temporary sibling that
``unseal_file`` writes is renamed onto ``--output`` only after the whole file authenticated
(deleted on any failure).

Exit codes as for ``enclaveml kbs``: 1 refused (release denied, unknown or disabled key,
unauthorized), 2 failed (broker unreachable, evidence or decryption failure), 3 bad usage or a
file that cannot be read or written (disk full, too large).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from enclaveml.cli._console import console, err_console, simulation_banner
from enclaveml.cli._options import Tee
from enclaveml.cli.kbs import CaOpt, JsonOpt, TokenOpt, UrlOpt, ca_of, reporting, require_url
from enclaveml.errors import ConfigurationError

_PROGRESS_THRESHOLD = 64 * 1024 * 1024
"""Files at least this large get a progress bar (on stderr, so --json output stays clean)."""


@contextmanager
def _progress(path: Path, verb: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A ``progress(bytes_done)`` callback drawing a rich bar, or None for small files."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if quiet or size < _PROGRESS_THRESHOLD:
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(f"{verb} {path.name}", *columns, console=err_console, transient=True) as bar:
        task = bar.add_task(verb, total=size)

        def update(done: int) -> None:
            bar.update(task, completed=done)

        yield update


def seal(
    source: Annotated[Path, typer.Argument(help="Plaintext file to seal.")],
    destination: Annotated[Path, typer.Argument(help="Where to write the sealed file.")],
    key: Annotated[str, typer.Option("--key", help="Broker key id to seal under (its latest version).")],
    content_type: Annotated[str, typer.Option(help="Content type recorded in the header.")] = (
        "application/octet-stream"
    ),
    model_name: Annotated[
        str | None,
        typer.Option(help="Model name the artifact may be served as (`serve --model NAME=...` checks it)."),
    ] = None,
    batchable: Annotated[
        bool,
        typer.Option(
            "--batchable",
            help="The model's rows along dim 0 are independent: requests of different clients may "
            "be run as one batch (never for models that mix rows: sets, sequences over dim 0).",
        ),
    ] = False,
    url: UrlOpt = "",
    token: TokenOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal SOURCE into DESTINATION under broker key --key (the broker wraps the data key)."""
    from enclaveml.crypto.sealed import read_header, seal_file
    from enclaveml.kms.admin import KeyBrokerAdmin
    from enclaveml.serving.secure import BATCHABLE_METADATA, MODEL_NAME_METADATA

    metadata = {} if model_name is None else {MODEL_NAME_METADATA: model_name}
    if batchable:
        metadata[BATCHABLE_METADATA] = "true"
    with reporting(as_json), _file_errors():
        with (
            KeyBrokerAdmin(require_url(url), token, verify=ca_of(ca)) as admin,
            _progress(source, "sealing", as_json) as progress,
        ):
            seal_file(
                source,
                destination,
                wrapper=admin,
                key_id=key,
                content_type=content_type,
                metadata=metadata,
                progress=progress,
            )
        header = read_header(destination)
    result = {"sealed": str(destination), "key_id": header.key_id, "version": header.key_version}
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(
            f"sealed {source} → {destination} under key {header.key_id!r} v{header.key_version}", markup=False
        )


def unseal(
    source: Annotated[Path, typer.Argument(help="Sealed file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The only place the plaintext is written.")],
    tee: Tee = "auto",
    kem: Annotated[str, typer.Option(help="HPKE KEM for the release: MLKEM768-X25519 or X25519.")] = (
        "MLKEM768-X25519"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    url: UrlOpt = "",
    ca: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attest to the broker, release the key SOURCE names, and decrypt SOURCE to --output."""
    from enclaveml.attestation.evidence import TeeType
    from enclaveml.attestation.providers import provider_by_name
    from enclaveml.crypto.sealed import unseal_file
    from enclaveml.kms.client import KeyBrokerClient

    with reporting(as_json), _file_errors():
        _distinct(source, output)
        if output.exists() and not force:
            raise ConfigurationError(f"{output} exists; pass --force to overwrite it")
        provider = provider_by_name(tee)
        if provider.tee is TeeType.SIMULATION:
            simulation_banner()
        with (
            KeyBrokerClient(require_url(url), provider, verify=ca_of(ca), kem=kem) as client,
            _progress(source, "unsealing", as_json) as progress,
        ):
            # The header printed is the one authenticated with the content, read once (SOURCE may
            # be a pipe, which cannot be read twice).
            header = unseal_file(source, output, unwrapper=client, progress=progress)
    result = {"unsealed": str(output), "key_id": header.key_id, "version": header.key_version}
    if as_json:
        console.print_json(json.dumps(result))
    else:
        err_console.print(
            f"unsealed {source} → {output} (key {header.key_id!r} v{header.key_version})", markup=False
        )


@contextmanager
def _file_errors() -> Iterator[None]:
    """A failed read or write (disk full, file too large, I/O error) is a reported error, not a traceback.

    The library has removed its partial output by then; exit code 3 (files or setup).
    """
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigurationError(f"file input/output failed{where}: {exc.strerror or exc}") from None


def _distinct(source: Path, destination: Path) -> None:
    if destination.exists() and source.resolve() == destination.resolve():
        raise ConfigurationError("input and output must be different files")


__all__ = ["seal", "unseal"]
