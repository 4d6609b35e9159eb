"""Choosing an evidence provider: detection of the TEE this process runs in, or selection by name.

This module owns the decision of *which* :class:`~enclaveml.attestation.evidence.EvidenceProvider`
a process uses. The rule that matters: simulation is never chosen on anyone's behalf. A
machine without a TEE makes :func:`detect` raise :class:`TEENotAvailableError`; simulated
evidence is only produced after someone asked for ``"simulation"`` by name, so a
misconfigured production host fails loudly instead of handing out worthless evidence.

Names accepted by :func:`provider_by_name`:

=============  ==============================================================
``auto``       :func:`detect` (Gramine first, then configfs-tsm)
``gramine``    :class:`GramineProvider` (SGX via ``/dev/attestation``)
``tsm``        :class:`TsmProvider` (TDX or SEV-SNP via configfs-tsm)
``tdx``        :class:`TsmProvider` that insists on a TDX guest
``sev-snp``    :class:`TsmProvider` that insists on an SEV-SNP guest
``simulation`` ``SimulationProvider`` (software keys; evidence proves nothing)
=============  ==============================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enclaveml.attestation._gramine import DEFAULT_GRAMINE_ROOT, GramineProvider
from enclaveml.attestation._tsm import DEFAULT_TSM_ROOT, TsmProvider
from enclaveml.attestation.evidence import EvidenceProvider, TeeType
from enclaveml.errors import ConfigurationError, TEENotAvailableError

__all__ = [
    "DEFAULT_GRAMINE_ROOT",
    "DEFAULT_TSM_ROOT",
    "PROVIDER_NAMES",
    "GramineProvider",
    "TsmProvider",
    "detect",
    "provider_by_name",
]

PROVIDER_NAMES = ("auto", "gramine", "tsm", "tdx", "sev-snp", "simulation")


def detect(
    *,
    gramine_root: str | Path = DEFAULT_GRAMINE_ROOT,
    tsm_root: str | Path = DEFAULT_TSM_ROOT,
) -> EvidenceProvider:
    """Return the provider for the TEE this process runs in.

    Gramine is checked first: inside a Gramine enclave ``/dev/attestation`` is the only
    interface that yields SGX evidence, and the host's configfs is not visible there.
    Raises :class:`TEENotAvailableError` when neither interface exists; it never returns
    a simulation provider.
    """
    gramine, tsm = Path(gramine_root), Path(tsm_root)
    if gramine.is_dir():
        return GramineProvider(gramine)
    if tsm.is_dir():
        return TsmProvider(tsm)
    raise TEENotAvailableError(
        f"no supported TEE interface found: checked {gramine} (Gramine SGX) and {tsm} "
        "(Linux configfs-tsm for TDX / SEV-SNP). Run inside a Gramine enclave or a TDX / SEV-SNP "
        "guest (Linux 6.7+, configfs mounted). Simulation is never selected automatically: for "
        "development, request it explicitly with --tee simulation or provider_by_name('simulation')"
    )


def provider_by_name(name: str, **options: Any) -> EvidenceProvider:
    """Return the provider called ``name`` (see the module docstring), built with ``options``.

    ``options`` are the keyword arguments of the chosen provider's constructor (for example
    ``root=`` for ``gramine``/``tsm``, ``gramine_root=``/``tsm_root=`` for ``auto``); an
    option the provider does not take is a :class:`ConfigurationError`.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"provider name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    factory: Callable[..., EvidenceProvider]
    if key == "auto":
        factory = detect
    elif key == "gramine":
        factory = GramineProvider
    elif key == "tsm":
        factory = TsmProvider
    elif key in ("tdx", "sev-snp"):
        if "expected_tee" in options:
            raise ConfigurationError(f"provider {key!r} fixes expected_tee; use 'tsm' to choose it")
        options = {**options, "expected_tee": TeeType(key)}
        factory = TsmProvider
    elif key == "simulation":
        # Imported here, not at module level, so that production code paths never even load
        # the simulation backend unless it was asked for by name.
        from enclaveml.attestation.simulation import SimulationProvider

        factory = SimulationProvider
    else:
        raise ConfigurationError(
            f"unknown evidence provider {name!r}; valid names are {', '.join(PROVIDER_NAMES)}"
        )
    _check_options(key, factory, options)
    return factory(**options)


def _check_options(name: str, factory: Callable[..., object], options: dict[str, Any]) -> None:
    # Binding against the signature turns an operator's typo into a ConfigurationError
    # without catching TypeError from inside the constructor, where it would mean a bug.
    public = {k: v for k, v in options.items() if not k.startswith("_")}
    if len(public) != len(options):
        hidden = sorted(set(options) - set(public))
        raise ConfigurationError(f"provider {name!r} does not accept private options {hidden}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        accepted = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and not p.name.startswith("_")
        ]
        raise ConfigurationError(
            f"invalid options for provider {name!r}: {exc}; accepted options: {', '.join(accepted) or 'none'}"
        ) from exc
