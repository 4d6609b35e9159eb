"""The policy base class and the combinators (AllOf, AnyOf, UnsafeAllowSimulation)."""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from enclaveml.attestation.claims import Claims
from enclaveml.errors import ConfigurationError, PolicyRejectedError

_log = logging.getLogger("enclaveml.attestation.policy")


class Policy(ABC):
    """One appraisal rule. ``check`` raises PolicyRejectedError or returns None."""

    type_name: ClassVar[str]

    def check(self, claims: Claims, *, allow_simulation: bool = False) -> None:
        """Appraise ``claims``; ``allow_simulation`` is set only by :class:`UnsafeAllowSimulation`."""
        if claims.simulated and not allow_simulation:
            raise PolicyRejectedError(
                "simulation",
                "simulated evidence",
                "evidence from a hardware TEE",
                detail=f"refused by rule '{self.type_name}': simulation protects nothing; only a policy "
                "wrapped in 'unsafe_allow_simulation' accepts it",
            )
        self._check(claims)

    @abstractmethod
    def _check(self, claims: Claims) -> None: ...

    @abstractmethod
    def _params(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data, loadable again with :func:`policy_from_dict`."""
        return {"type": self.type_name, **self._params()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


class AllOf(Policy):
    """Every rule must accept. An empty AllOf rejects everything (fail closed)."""

    type_name = "all_of"

    def __init__(self, *rules: Policy) -> None:
        self.rules = tuple(_require_policy(r) for r in rules)

    def check(self, claims: Claims, *, allow_simulation: bool = False) -> None:
        if not self.rules:
            raise PolicyRejectedError(self.type_name, "no rules", "at least one rule", detail="empty all_of")
        for rule in self.rules:
            rule.check(claims, allow_simulation=allow_simulation)

    def _check(self, claims: Claims) -> None:  # pragma: no cover - check() is overridden
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}


class AnyOf(Policy):
    """At least one rule must accept. An empty AnyOf rejects everything."""

    type_name = "any_of"

    def __init__(self, *rules: Policy) -> None:
        self.rules = tuple(_require_policy(r) for r in rules)

    def check(self, claims: Claims, *, allow_simulation: bool = False) -> None:
        failures: list[str] = []
        for rule in self.rules:
            try:
                rule.check(claims, allow_simulation=allow_simulation)
            except PolicyRejectedError as exc:
                failures.append(str(exc))
            else:
                return
        raise PolicyRejectedError(
            self.type_name,
            "; ".join(failures) if failures else "no rules",
            "at least one alternative to accept",
        )

    def _check(self, claims: Claims) -> None:  # pragma: no cover - check() is overridden
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}


class UnsafeAllowSimulation(Policy):
    """UNSAFE: lets the wrapped policy accept simulation evidence. For development only."""

    type_name = "unsafe_allow_simulation"

    def __init__(self, policy: Policy) -> None:
        self.policy = _require_policy(policy)
        self._warned = False
        _log.warning("policy %s accepts SIMULATION evidence, which protects nothing", self.type_name)

    def check(self, claims: Claims, *, allow_simulation: bool = False) -> None:
        if claims.simulated and not self._warned:
            # Once per policy object: loud enough to be seen, not a line per key release.
            self._warned = True
            _log.warning("accepting SIMULATED evidence under an unsafe policy; it protects nothing")
        self.policy.check(claims, allow_simulation=True)

    def _check(self, claims: Claims) -> None:  # pragma: no cover - check() is overridden
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict()}


def _require_policy(value: Any) -> Policy:
    if not isinstance(value, Policy):
        raise ConfigurationError(f"expected a Policy, got {type(value).__name__}")
    return value
