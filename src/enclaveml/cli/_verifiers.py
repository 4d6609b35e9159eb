"""Building an EvidenceVerifier from command-line options, shared by every command that verifies.

Hardware verifiers are always present (SEV-SNP with the built-in AMD roots; DCAP when
collateral is given); the simulation verifier exists only when a simulation key is named,
and then the simulation banner is printed.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclaveml.attestation import DcapVerifier, EvidenceVerifier, LocalCollateral, PccsCollateral, SnpVerifier
from enclaveml.errors import ConfigurationError

__all__ = ["build_verifier", "default_cache_dir", "read_file", "simulation_public_key"]


def build_verifier(
    *,
    collateral: Path | None = None,
    pccs: str | None = None,
    cache_dir: Path | None = None,
    vcek: Path | None = None,
    ask_ark: Path | None = None,
    simulation_key: Path | None = None,
    banner: bool = True,
) -> EvidenceVerifier:
    """The verifier the options describe; ``--collateral`` and ``--pccs`` are exclusive."""
    if collateral is not None and pccs is not None:
        raise ConfigurationError("give either --collateral or --pccs, not both")
    dcap = None
    if collateral is not None:
        dcap = DcapVerifier(LocalCollateral(collateral))
    elif pccs is not None:
        dcap = DcapVerifier(PccsCollateral(pccs, cache_dir=cache_dir or default_cache_dir()))
    snp = SnpVerifier(
        ask_ark_pem=read_file(ask_ark, "ASK/ARK") if ask_ark else None,
        vcek=read_file(vcek, "VCEK") if vcek else None,
    )
    simulation = None
    if simulation_key is not None:
        from enclaveml.attestation.simulation import SimulationVerifier
        from enclaveml.cli._console import simulation_banner

        if banner:
            simulation_banner()
        simulation = SimulationVerifier(simulation_public_key(simulation_key))
    return EvidenceVerifier(dcap=dcap, snp=snp, simulation=simulation)


def simulation_public_key(path: Path) -> Ed25519PublicKey:
    """The simulation public key from a PEM file holding the private or the public key."""
    pem = read_file(path, "simulation key")
    try:
        key: object = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise ConfigurationError(f"{path} is not a PEM Ed25519 key") from exc
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise ConfigurationError(f"{path} is not an Ed25519 key")


def default_cache_dir() -> Path:
    """Where fetched DCAP collateral is cached: $XDG_CACHE_HOME/enclaveml/collateral."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enclaveml" / "collateral"


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} file {path}: {exc.strerror}") from exc
