"""Issuing participant credentials for the FL servers: random tokens out, SHA-256 hashes in a registry.

``enclaveml fl enrol`` and ``enclaveml vfl enrol`` share this. The registry file holds only the
hashes (the server loads it); each token is printed once, for the operator to hand to its owner.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enclaveml.errors import ConfigurationError
from enclaveml.fl.plan import token_sha256

__all__ = ["issue_credentials", "read_registry"]


def read_registry(path: Path, section: str) -> dict[str, str]:
    """The ``section`` mapping (name → SHA-256 hex) of a registry file; empty if the file is absent."""
    if not path.exists():
        return {}
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the registry {path}: {exc}") from exc
    entries = data.get(section, {}) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ConfigurationError(f"{path} is not a registry with a {section!r} mapping")
    return {str(k): str(v) for k, v in entries.items()}


def issue_credentials(path: Path, section: str, names: Sequence[str]) -> dict[str, str]:
    """(Re-)issue a credential for each of ``names``: hashes to the registry, tokens to the caller."""
    known = read_registry(path, section)
    issued = {name: secrets.token_urlsafe(32) for name in names}
    known.update({name: token_sha256(token).hex() for name, token in issued.items()})
    path.write_text(json.dumps({section: known}, indent=2, sort_keys=True) + "\n")
    return issued
