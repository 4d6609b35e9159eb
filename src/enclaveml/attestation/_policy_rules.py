"""The leaf appraisal rules: each checks one property of verified claims."""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from typing import Any

from enclaveml.attestation._policy_base import Policy
from enclaveml.attestation.claims import Claims, SgxClaims, SnpClaims, SnpTcb
from enclaveml.attestation.evidence import TeeType
from enclaveml.errors import ConfigurationError, PolicyRejectedError


class MeasurementAllowlist(Policy):
    """The primary measurement (MRENCLAVE / MRTD / SNP MEASUREMENT / simulated) must be listed."""

    type_name = "measurement"

    def __init__(self, values: Iterable[bytes | str]) -> None:
        self.values = tuple(_to_bytes(v, "measurement") for v in values)
        if not self.values:
            raise ConfigurationError("measurement rule needs at least one allowed value")

    def _check(self, claims: Claims) -> None:
        if not any(hmac.compare_digest(claims.measurement, v) for v in self.values):
            raise PolicyRejectedError(
                self.type_name,
                f"{claims.measurement_name}={claims.measurement.hex()}",
                f"one of [{', '.join(v.hex() for v in self.values)}]",
            )

    def _params(self) -> dict[str, Any]:
        return {"values": [v.hex() for v in self.values]}


class SgxSigner(Policy):
    """SGX only: enclave signer (MRSIGNER), product id and a minimum security version."""

    type_name = "sgx_signer"

    def __init__(self, mrsigner: bytes | str, isv_prod_id: int, min_isv_svn: int = 0) -> None:
        self.mrsigner = _to_bytes(mrsigner, "mrsigner", size=32)
        self.isv_prod_id = _to_int(isv_prod_id, "isv_prod_id", 0xFFFF)
        self.min_isv_svn = _to_int(min_isv_svn, "min_isv_svn", 0xFFFF)

    def _check(self, claims: Claims) -> None:
        if not isinstance(claims, SgxClaims):
            raise PolicyRejectedError(self.type_name, f"tee={claims.tee.value}", "SGX evidence")
        if not hmac.compare_digest(claims.mrsigner, self.mrsigner):
            raise PolicyRejectedError(
                self.type_name, f"mrsigner={claims.mrsigner.hex()}", self.mrsigner.hex()
            )
        if claims.isv_prod_id != self.isv_prod_id:
            raise PolicyRejectedError(
                self.type_name, f"isv_prod_id={claims.isv_prod_id}", str(self.isv_prod_id)
            )
        if claims.isv_svn < self.min_isv_svn:
            raise PolicyRejectedError(self.type_name, f"isv_svn={claims.isv_svn}", f">= {self.min_isv_svn}")

    def _params(self) -> dict[str, Any]:
        return {
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "min_isv_svn": self.min_isv_svn,
        }


class DebugMode(Policy):
    """Debug TEEs (whose memory the host can read) are rejected unless ``allow`` is true."""

    type_name = "debug"

    def __init__(self, allow: bool = False) -> None:
        if not isinstance(allow, bool):
            raise ConfigurationError("debug.allow must be true or false")
        self.allow = allow

    def _check(self, claims: Claims) -> None:
        if claims.debug and not self.allow:
            raise PolicyRejectedError(self.type_name, "debug=true", "a production (non-debug) TEE")

    def _params(self) -> dict[str, Any]:
        return {"allow": self.allow}


# Intel's TCB statuses (the TCB Info / QE Identity specification; the TDRelaunch* ones are TDX
# module statuses), as dcap-qvl reports them.
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
)
_ADVISORY_ID = re.compile(r"INTEL-[A-Z]+-[0-9]{5}")


class TcbStatus(Policy):
    """SGX/TDX: the platform's TCB status must be accepted and no rejected advisory may apply.

    Both lists are checked when the policy is built: a misspelt status could never match (fail
    closed, but silently useless), and a misspelt advisory id would never reject anything (fail
    open: ``intel-sa-00615`` or ``INTEL-SA-615`` would let the advisory through). Advisory ids are
    compared upper-case, in Intel's form ``INTEL-SA-NNNNN``.

    ``min_evaluation_data_number`` (0: any) requires the status to come from collateral of at least
    that TCB evaluation: older collateral stays valid for weeks after a TCB recovery and still
    calls the platforms the recovery downgraded ``UpToDate``.
    """

    type_name = "tcb_status"

    def __init__(
        self,
        accepted: Iterable[str] = ("UpToDate",),
        rejected_advisories: Iterable[str] = (),
        min_evaluation_data_number: int = 0,
    ) -> None:
        if (
            isinstance(min_evaluation_data_number, bool)
            or not isinstance(min_evaluation_data_number, int)
            or min_evaluation_data_number < 0
        ):
            raise ConfigurationError("tcb_status.min_evaluation_data_number must be an integer >= 0")
        self.min_evaluation_data_number = min_evaluation_data_number
        self.accepted = _strings(accepted, "tcb_status.accepted")
        unknown = [status for status in self.accepted if status not in TCB_STATUSES]
        if unknown:
            raise ConfigurationError(
                f"tcb_status.accepted has unknown statuses {unknown}; Intel's are {list(TCB_STATUSES)}"
            )
        self.rejected_advisories = tuple(
            _advisory_id(a) for a in _strings(rejected_advisories, "tcb_status.rejected_advisories")
        )
        if not self.accepted:
            raise ConfigurationError("tcb_status rule needs at least one accepted status")

    def _check(self, claims: Claims) -> None:
        if claims.tcb_status is None:
            raise PolicyRejectedError(
                self.type_name,
                f"no TCB status ({claims.tee.value} evidence)",
                f"status in {list(self.accepted)}",
                detail="SEV-SNP has no TCB status; use an 'snp_min_tcb' rule for it",
            )
        if claims.tcb_status not in self.accepted:
            raise PolicyRejectedError(
                self.type_name,
                f"tcb_status={claims.tcb_status} advisories={list(claims.advisory_ids)}",
                f"status in {list(self.accepted)}",
            )
        if self.min_evaluation_data_number:
            number = getattr(claims, "tcb_evaluation_data_number", None)
            if number is None or number < self.min_evaluation_data_number:
                raise PolicyRejectedError(
                    self.type_name,
                    f"collateral of TCB evaluation {number}",
                    f"TCB evaluation >= {self.min_evaluation_data_number}",
                    detail="fetch current collateral (after the TCB recovery the policy names)",
                )
        hit = sorted({a.upper() for a in claims.advisory_ids} & set(self.rejected_advisories))
        if hit:
            raise PolicyRejectedError(self.type_name, f"advisories {hit}", "none of the rejected advisories")

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "accepted": list(self.accepted),
            "rejected_advisories": list(self.rejected_advisories),
        }
        if self.min_evaluation_data_number:  # absent when unset: older policies keep their JSON
            params["min_evaluation_data_number"] = self.min_evaluation_data_number
        return params


class SnpMinimumTcb(Policy):
    """SEV-SNP only: every component of the reported TCB must be at least the given version."""

    type_name = "snp_min_tcb"

    def __init__(self, bootloader: int = 0, tee: int = 0, snp: int = 0, microcode: int = 0) -> None:
        self.minimum = SnpTcb(
            _to_int(bootloader, "bootloader", 255),
            _to_int(tee, "tee", 255),
            _to_int(snp, "snp", 255),
            _to_int(microcode, "microcode", 255),
        )

    def _check(self, claims: Claims) -> None:
        if not isinstance(claims, SnpClaims):
            raise PolicyRejectedError(self.type_name, f"tee={claims.tee.value}", "SEV-SNP evidence")
        if not claims.reported_tcb.at_least(self.minimum):
            raise PolicyRejectedError(
                self.type_name, f"reported_tcb {claims.reported_tcb}", f">= {self.minimum}"
            )

    def _params(self) -> dict[str, Any]:
        m = self.minimum
        return {"bootloader": m.bootloader, "tee": m.tee, "snp": m.snp, "microcode": m.microcode}


class SnpGuest(Policy):
    """SEV-SNP only: who asked for the report (VMPL) and the guest policy the VM was launched with.

    A report requested from a VMPL above ``max_vmpl`` comes from less privileged code in the guest
    (e.g. a user process behind an SVSM at VMPL 0). ``MIGRATE_MA`` (policy bit 18) lets a migration
    agent move the VM, with its memory, to another host; ``SMT`` (bit 16) allows the VM onto
    sibling hyperthreads; ``SINGLE_SOCKET`` (bit 20) keeps it on one socket. Debug (bit 19) is the
    ``debug`` rule's. Reference: AMD SEV-SNP ABI specification, guest policy.
    """

    type_name = "snp_guest"
    _SMT, _MIGRATE_MA, _SINGLE_SOCKET = 1 << 16, 1 << 18, 1 << 20

    def __init__(
        self,
        max_vmpl: int = 0,
        allow_migrate_ma: bool = False,
        allow_smt: bool = True,
        require_single_socket: bool = False,
    ) -> None:
        self.max_vmpl = _to_int(max_vmpl, "snp_guest.max_vmpl", 3)
        flags = {"allow_migrate_ma": allow_migrate_ma, "allow_smt": allow_smt,
                 "require_single_socket": require_single_socket}  # fmt: skip
        for what, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigurationError(f"snp_guest.{what} must be true or false")
        self.allow_migrate_ma, self.allow_smt = allow_migrate_ma, allow_smt
        self.require_single_socket = require_single_socket

    def _check(self, claims: Claims) -> None:
        if not isinstance(claims, SnpClaims):
            raise PolicyRejectedError(self.type_name, f"tee={claims.tee.value}", "SEV-SNP evidence")
        if claims.vmpl > self.max_vmpl:
            raise PolicyRejectedError(self.type_name, f"vmpl={claims.vmpl}", f"vmpl <= {self.max_vmpl}")
        policy = claims.policy
        if policy & self._MIGRATE_MA and not self.allow_migrate_ma:
            raise PolicyRejectedError(
                self.type_name, f"policy={policy:#x} (MIGRATE_MA)", "no migration agent"
            )
        if policy & self._SMT and not self.allow_smt:
            raise PolicyRejectedError(self.type_name, f"policy={policy:#x} (SMT)", "SMT not allowed")
        if self.require_single_socket and not policy & self._SINGLE_SOCKET:
            raise PolicyRejectedError(self.type_name, f"policy={policy:#x}", "SINGLE_SOCKET set")

    def _params(self) -> dict[str, Any]:
        return {
            "max_vmpl": self.max_vmpl,
            "allow_migrate_ma": self.allow_migrate_ma,
            "allow_smt": self.allow_smt,
            "require_single_socket": self.require_single_socket,
        }


class ReportDataEquals(Policy):
    """Report data must equal the expected value (shorter values are zero-padded to 64 bytes)."""

    type_name = "report_data"

    def __init__(self, value: bytes | str) -> None:
        raw = _to_bytes(value, "report_data")
        if len(raw) > 64:
            raise ConfigurationError("report_data rule value is longer than 64 bytes")
        self.value = raw.ljust(64, b"\x00")

    def _check(self, claims: Claims) -> None:
        if not hmac.compare_digest(claims.report_data, self.value):
            raise PolicyRejectedError(
                self.type_name, f"report_data={claims.report_data.hex()}", self.value.hex()
            )

    def _params(self) -> dict[str, Any]:
        return {"value": self.value.hex()}


class ClaimEquals(Policy):
    """A TEE-specific claim (e.g. ``host_data``, ``mr_config_id``, ``rtmr3``) must equal a value."""

    type_name = "claim"

    def __init__(self, name: str, value: bytes | str | int) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("claim rule needs a claim name")
        self.name = name
        self.value: bytes | int = value if isinstance(value, int) else _to_bytes(value, name)

    def _check(self, claims: Claims) -> None:
        observed = _claim_value(claims, self.name)
        if observed is None:
            raise PolicyRejectedError(
                self.type_name,
                f"no claim {self.name!r} in {claims.tee.value} evidence",
                f"{self.name}={_show(self.value)}",
            )
        equal = (
            hmac.compare_digest(observed, self.value)
            if isinstance(observed, bytes) and isinstance(self.value, bytes)
            else observed == self.value
        )
        if not equal:
            raise PolicyRejectedError(self.type_name, f"{self.name}={_show(observed)}", _show(self.value))

    def _params(self) -> dict[str, Any]:
        return {"name": self.name, "value": _show(self.value)}


class TeeTypes(Policy):
    """The evidence must come from one of the listed TEE types."""

    type_name = "tee"

    def __init__(self, allowed: Iterable[str | TeeType]) -> None:
        try:
            self.allowed = tuple(TeeType(t) for t in allowed)
        except ValueError as exc:
            raise ConfigurationError(f"unknown TEE type in tee rule: {exc}") from exc
        if not self.allowed:
            raise ConfigurationError("tee rule needs at least one allowed TEE type")

    def _check(self, claims: Claims) -> None:
        if claims.tee not in self.allowed:
            raise PolicyRejectedError(
                self.type_name, f"tee={claims.tee.value}", f"one of {[t.value for t in self.allowed]}"
            )

    def _params(self) -> dict[str, Any]:
        return {"allowed": [t.value for t in self.allowed]}


# -- helpers ----------------------------------------------------------------------------------------


def _to_bytes(value: bytes | str, what: str, *, size: int | None = None) -> bytes:
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError as exc:
            raise ConfigurationError(f"{what} must be hex, got {value!r}") from exc
    elif isinstance(value, bytes):
        raw = value
    else:
        raise ConfigurationError(f"{what} must be bytes or a hex string")
    if size is not None and len(raw) != size:
        raise ConfigurationError(f"{what} must be {size} bytes, got {len(raw)}")
    if not raw:
        raise ConfigurationError(f"{what} must not be empty")
    return raw


def _to_int(value: Any, what: str, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ConfigurationError(f"{what} must be an integer in 0..{maximum}")
    return value


def _claim_value(claims: Claims, name: str) -> bytes | int | None:
    if name.startswith("rtmr") and name[4:].isdigit() and hasattr(claims, "rtmr"):
        index = int(name[4:])
        rtmr: tuple[bytes, ...] = claims.rtmr
        return rtmr[index] if index < len(rtmr) else None
    value = getattr(claims, name, None)
    return value if isinstance(value, bytes | int) and not isinstance(value, bool) else None


def _show(value: bytes | int) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


def _advisory_id(value: str) -> str:
    normalised = value.strip().upper()
    if not _ADVISORY_ID.fullmatch(normalised):
        raise ConfigurationError(
            f"tcb_status.rejected_advisories: {value!r} is not an Intel advisory id "
            "(INTEL-SA-NNNNN, five digits)"
        )
    return normalised


def _strings(values: Iterable[str], what: str) -> tuple[str, ...]:
    """A list of strings; a bare string is refused, not split into characters (that fails open)."""
    items = tuple(values) if not isinstance(values, str | bytes) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ConfigurationError(f"{what} must be a list of strings")
    return items
