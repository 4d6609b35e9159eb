"""Appraisal policy: small composable rules that decide whether verified claims are acceptable.

Each rule checks one thing and raises :class:`~enclaveml.errors.PolicyRejectedError` naming
itself, the observed value and what it expected; it returns ``None`` on success. Rules fail
closed: an empty :class:`AllOf` or :class:`AnyOf` rejects, a rule that does not apply to the
evidence's TEE type rejects, and **every rule rejects simulation evidence** unless it sits
inside an :class:`UnsafeAllowSimulation` wrapper (the only rule with "unsafe" in its name).

Policies load from TOML or JSON (:func:`load_policy`) and serialise back with
:meth:`Policy.to_dict` (:func:`dump_policy` writes JSON). A file holds one rule; composites
nest. Example ``policy.toml``::

    type = "all_of"

    [[rules]]
    type = "measurement"
    values = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]

    [[rules]]
    type = "debug"            # debug forbidden (allow = false is the default)

    [[rules]]
    type = "tcb_status"
    accepted = ["UpToDate", "SWHardeningNeeded"]
    rejected_advisories = ["INTEL-SA-00615"]
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enclaveml.attestation._policy_base import AllOf, AnyOf, Policy, UnsafeAllowSimulation
from enclaveml.attestation._policy_rules import (
    ClaimEquals,
    DebugMode,
    MeasurementAllowlist,
    ReportDataEquals,
    SgxSigner,
    SnpGuest,
    SnpMinimumTcb,
    TcbStatus,
    TeeTypes,
)
from enclaveml.errors import ConfigurationError

__all__ = [
    "AllOf",
    "AnyOf",
    "ClaimEquals",
    "DebugMode",
    "MeasurementAllowlist",
    "Policy",
    "ReportDataEquals",
    "SgxSigner",
    "SnpGuest",
    "SnpMinimumTcb",
    "TcbStatus",
    "TeeTypes",
    "UnsafeAllowSimulation",
    "default_policy",
    "dump_policy",
    "load_policy",
    "policy_from_dict",
]


def default_policy() -> Policy:
    """Hardware evidence only, no debug TEEs, TCB UpToDate. Add a measurement rule for real use."""
    return AllOf(DebugMode(allow=False), TcbStatus())


# -- loading -------------------------------------------------------------------------------------

_Factory = Callable[[Mapping[str, Any]], Policy]

MAX_POLICY_DEPTH = 32


def _composite(cls: type[AllOf] | type[AnyOf]) -> _Factory:
    def build(d: Mapping[str, Any]) -> Policy:
        rules = d.get("rules", [])
        if not isinstance(rules, list):
            raise ConfigurationError(f"{cls.type_name}.rules must be a list of rules")
        return cls(*(_build(r) for r in rules))

    return build


_FACTORIES: dict[str, tuple[_Factory, frozenset[str]]] = {
    "all_of": (_composite(AllOf), frozenset({"rules"})),
    "any_of": (_composite(AnyOf), frozenset({"rules"})),
    "unsafe_allow_simulation": (
        lambda d: UnsafeAllowSimulation(_build(d.get("policy"))),
        frozenset({"policy"}),
    ),
    "measurement": (lambda d: MeasurementAllowlist(_list(d, "values")), frozenset({"values"})),
    "sgx_signer": (lambda d: SgxSigner(**d), frozenset({"mrsigner", "isv_prod_id", "min_isv_svn"})),
    "debug": (lambda d: DebugMode(**d), frozenset({"allow"})),
    "tcb_status": (
        lambda d: TcbStatus(**d),
        frozenset({"accepted", "rejected_advisories", "min_evaluation_data_number"}),
    ),
    "snp_min_tcb": (lambda d: SnpMinimumTcb(**d), frozenset({"bootloader", "tee", "snp", "microcode"})),
    "snp_guest": (
        lambda d: SnpGuest(**d),
        frozenset({"max_vmpl", "allow_migrate_ma", "allow_smt", "require_single_socket"}),
    ),
    "report_data": (lambda d: ReportDataEquals(d.get("value", "")), frozenset({"value"})),
    "claim": (lambda d: ClaimEquals(d.get("name", ""), d.get("value", "")), frozenset({"name", "value"})),
    "tee": (lambda d: TeeTypes(_list(d, "allowed")), frozenset({"allowed"})),
}


def policy_from_dict(data: Any) -> Policy:
    """Build a policy from plain data (as parsed from TOML/JSON); unknown types or keys are errors.

    Nesting deeper than ``MAX_POLICY_DEPTH`` tables and lists is refused before anything is built:
    building and appraising recurse, and a policy is data anyone with a policy-writing token sends.
    """
    if _depth(data) > MAX_POLICY_DEPTH:
        raise ConfigurationError(f"a policy may nest at most {MAX_POLICY_DEPTH} tables and lists deep")
    return _build(data)


def _depth(data: Any) -> int:
    """How deeply ``data`` nests dicts and lists (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_POLICY_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def _build(data: Any) -> Policy:
    if not isinstance(data, Mapping):
        raise ConfigurationError("a policy must be a table/object with a 'type' key")
    kind = data.get("type")
    if kind not in _FACTORIES:
        raise ConfigurationError(f"unknown policy type {kind!r}; known: {sorted(_FACTORIES)}")
    factory, keys = _FACTORIES[kind]
    params = {k: v for k, v in data.items() if k != "type"}
    unknown = set(params) - keys
    if unknown:
        raise ConfigurationError(
            f"policy type {kind!r} has unknown keys {sorted(unknown)}; allowed: {sorted(keys)}"
        )
    try:
        return factory(params)
    except TypeError as exc:
        raise ConfigurationError(f"invalid parameters for policy type {kind!r}: {exc}") from exc


def load_policy(path: str | Path) -> Policy:
    """Load a policy from a ``.toml`` or ``.json`` file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read policy file {file}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"policy file {file} is not valid {file.suffix.lstrip('.').upper()}: {exc}"
        ) from exc
    return policy_from_dict(data)


def dump_policy(policy: Policy) -> str:
    """Serialise a policy as canonical JSON (what the key broker stores)."""
    return json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))


# -- helpers ----------------------------------------------------------------------------------------


def _list(d: Mapping[str, Any], key: str) -> list[Any]:
    value = d.get(key)
    if not isinstance(value, list):
        raise ConfigurationError(f"'{key}' must be a list")
    return value
