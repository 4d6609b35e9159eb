"""`enclaveml attest`: verify evidence against a policy, or collect evidence inside a TEE.

Exit codes of ``attest verify``: 0 accepted; 1 rejected by the policy (the rule is named);
2 the evidence failed verification or binding; 3 bad arguments, files or collateral setup.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from enclaveml.attestation import (
    Evidence,
    EvidenceVerifier,
    TeeType,
    default_policy,
    load_policy,
    provider_by_name,
)
from enclaveml.attestation.evidence import REPORT_DATA_SIZE
from enclaveml.cli._console import claims_table, console, err_console, simulation_banner
from enclaveml.cli._options import Tee
from enclaveml.cli._verifiers import build_verifier
from enclaveml.errors import (
    AttestationError,
    ConfigurationError,
    EnclaveMLError,
    PolicyRejectedError,
)

app = typer.Typer(help="Collect and verify TEE attestation evidence.", no_args_is_help=True)

EXIT_REJECTED, EXIT_INVALID, EXIT_USAGE = 1, 2, 3


@app.command("verify")
def verify(
    evidence_file: Annotated[
        Path, typer.Argument(help="Quote, SEV-SNP report (binary or hex) or evidence envelope.")
    ],
    collateral: Annotated[
        Path | None, typer.Option(help="dcap-qvl collateral JSON file or a directory of them (SGX/TDX).")
    ] = None,
    pccs: Annotated[
        str | None, typer.Option(help="PCCS or Intel PCS base URL to fetch collateral from.")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where fetched collateral is cached (default: XDG cache).")
    ] = None,
    vcek: Annotated[Path | None, typer.Option(help="VCEK certificate (DER/PEM) for SEV-SNP reports.")] = None,
    ask_ark: Annotated[
        Path | None, typer.Option(help="AMD ASK+ARK PEM (default: built-in Milan roots).")
    ] = None,
    simulation_key: Annotated[
        Path | None, typer.Option(help="Simulation key PEM: enables verifying SIMULATED evidence (unsafe).")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="Appraisal policy (TOML or JSON); default: hardware, no debug, UpToDate."),
    ] = None,
    at: Annotated[int | None, typer.Option(help="Verify as of this Unix time instead of now.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Verify EVIDENCE, print its claims and the policy verdict; exit non-zero naming the failing rule."""
    result: dict[str, Any] = {"evidence": str(evidence_file)}
    try:
        if collateral is not None and pccs is not None:
            raise ConfigurationError("give either --collateral or --pccs, not both")
        evidence = _read_evidence(evidence_file)
        verifier = _build_verifier(evidence, collateral, pccs, cache_dir, vcek, ask_ark, simulation_key)
        appraisal = load_policy(policy) if policy is not None else default_policy()
    except ConfigurationError as exc:
        _fail(result, as_json, "configuration", str(exc), EXIT_USAGE)
    except AttestationError as exc:
        _fail(result, as_json, "evidence", str(exc), EXIT_INVALID)
    try:
        claims = verifier.verify(evidence, now=at)
    except ConfigurationError as exc:
        _fail(result, as_json, "configuration", str(exc), EXIT_USAGE)
    except EnclaveMLError as exc:
        _fail(result, as_json, "verification", str(exc), EXIT_INVALID)
    result["claims"] = claims.to_dict()
    if claims.simulated and not as_json:
        simulation_banner()
    if not as_json:
        console.print(claims_table(result["claims"]))
    try:
        appraisal.check(claims)
    except PolicyRejectedError as exc:
        result["verdict"] = {
            "accepted": False,
            "rule": exc.rule,
            "observed": exc.observed,
            "expected": exc.expected,
        }
        _emit(result, as_json, f"[bold red]REJECTED[/bold red] by rule '{exc.rule}': {exc}")
        raise typer.Exit(EXIT_REJECTED) from None
    result["verdict"] = {"accepted": True}
    _emit(result, as_json, "[bold green]ACCEPTED[/bold green] by the policy")


@app.command("collect")
def collect(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the evidence envelope.")],
    tee: Tee = "auto",
    report_data: Annotated[str, typer.Option(help="64 bytes of report data as hex (zero-padded).")] = "",
) -> None:
    """Collect evidence inside a TEE (binding REPORT_DATA) and write it to OUTPUT."""
    try:
        data = bytes.fromhex(report_data) if report_data else b""
        if len(data) > REPORT_DATA_SIZE:
            raise ConfigurationError(f"--report-data is longer than {REPORT_DATA_SIZE} bytes")
        provider = provider_by_name(tee)
        if provider.tee is TeeType.SIMULATION:
            simulation_banner()
        evidence = provider.collect(data.ljust(REPORT_DATA_SIZE, b"\x00"))
        output.write_bytes(evidence.to_bytes())
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] --report-data must be hex: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except EnclaveMLError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_INVALID) from None
    err_console.print(f"wrote {evidence.tee.value} evidence ({len(evidence.data)} bytes) to {output}")


def _read_evidence(path: Path) -> Evidence:
    try:
        return Evidence.from_bytes(path.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read evidence file {path}: {exc.strerror}") from exc


def _build_verifier(
    evidence: Evidence,
    collateral: Path | None,
    pccs: str | None,
    cache_dir: Path | None,
    vcek: Path | None,
    ask_ark: Path | None,
    simulation_key: Path | None,
) -> EvidenceVerifier:
    if collateral is None and pccs is None and evidence.tee in (TeeType.SGX, TeeType.TDX):
        raise ConfigurationError(f"{evidence.tee.value} evidence needs --collateral FILE or --pccs URL")
    if simulation_key is None and evidence.tee is TeeType.SIMULATION:
        raise ConfigurationError(
            "simulation evidence is verifiable only with --simulation-key (it protects nothing)"
        )
    return build_verifier(
        collateral=collateral,
        pccs=pccs,
        cache_dir=cache_dir,
        vcek=vcek,
        ask_ark=ask_ark,
        simulation_key=simulation_key,
        banner=False,
    )


def _emit(result: dict[str, Any], as_json: bool, message: str) -> None:
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(message)


def _fail(result: dict[str, Any], as_json: bool, stage: str, message: str, code: int) -> NoReturn:
    result["error"] = {"stage": stage, "message": message}
    if as_json:
        console.print_json(json.dumps(result))
    else:
        err_console.print(f"[bold red]{stage} failed:[/bold red] {message}")
    logging.getLogger(__name__).debug("attest verify failed at %s: %s", stage, message)
    raise typer.Exit(code)
