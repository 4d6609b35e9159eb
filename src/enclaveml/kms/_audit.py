"""The key broker's tamper-evident audit log: record format, hash chain and chain verification.

Every release, denial and admin change becomes one record. Records are chained so that
editing, deleting, inserting or reordering a row is detected by :func:`verify_chain`.

Record hash, byte by byte (``docs/kbs-protocol.md``)::

    hash      = SHA-256(prev_hash || canonical)
    prev_hash = hash of the previous record; 32 zero bytes for the first record
    canonical = UTF-8 of json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    fields    = {"seq": int, "time": float (Unix seconds, millisecond precision), "event": str,
                 "key_id": str | null, "version": int | null, "verdict": str,
                 "measurement": str (lowercase hex) | null, "rule": str | null, "detail": str}

The chain alone cannot detect the removal of the newest records (the remaining prefix is
still a valid chain), so storage also keeps the *head* ``(seq, hash)`` of the last record,
updated in the same transaction; :func:`verify_chain` checks it when given. Anyone able to
rewrite the database can still recompute a whole forged chain: export the head regularly
to somewhere the broker host cannot write if that matters.

Audit records hold measurements, rule names and short messages only, never key material.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditRecord",
    "ChainVerdict",
    "attributed",
    "chain_hash",
    "policy_detail",
    "verify_chain",
]

GENESIS_HASH = bytes(32)
_MAX_DETAIL = 500


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, before storage numbers and chains it.

    ``event`` is e.g. ``release``, ``key.create``; ``verdict`` is ``released``, ``denied`` or
    ``ok``; ``rule`` names the check that refused a release.
    """

    time: float
    event: str
    verdict: str
    key_id: str | None = None
    version: int | None = None
    measurement: str | None = None
    rule: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        # Millisecond precision keeps the JSON form of ``time`` short and identical after a
        # round trip through SQLite's REAL; truncating ``detail`` bounds what a client can write.
        object.__setattr__(self, "time", round(float(self.time), 3))
        if len(self.detail) > _MAX_DETAIL:
            object.__setattr__(self, "detail", self.detail[: _MAX_DETAIL - 3] + "...")


def attributed(actor: str | None, detail: str = "") -> str:
    """``detail`` of an admin record: who did it first, so truncation never drops the actor."""
    if not actor:
        return detail
    return f"by {actor}: {detail}" if detail else f"by {actor}"


def policy_detail(policy_json: str) -> str:
    """A release policy in a record: its SHA-256 (always within the 500 characters), then its text.

    A long policy's text is cut at the limit; the hash still identifies exactly which policy was
    set (compare it with the SHA-256 of the policy a key holds now).
    """
    digest = hashlib.sha256(policy_json.encode()).hexdigest()
    return f"policy sha256:{digest} {policy_json}"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored, chained audit record."""

    seq: int
    time: float
    event: str
    key_id: str | None
    version: int | None
    verdict: str
    measurement: str | None
    rule: str | None
    detail: str
    prev_hash: bytes
    hash: bytes

    @classmethod
    def seal(cls, seq: int, event: AuditEvent, prev_hash: bytes) -> AuditRecord:
        """Number ``event`` as ``seq`` and chain it after ``prev_hash``."""
        fields: dict[str, Any] = {  # the same dict fields() returns, built once
            "seq": seq,
            "time": event.time,
            "event": event.event,
            "key_id": event.key_id,
            "version": event.version,
            "verdict": event.verdict,
            "measurement": event.measurement,
            "rule": event.rule,
            "detail": event.detail,
        }
        return cls(**fields, prev_hash=prev_hash, hash=chain_hash(prev_hash, fields))

    def fields(self) -> dict[str, Any]:
        """The hashed fields (everything except ``prev_hash`` and ``hash``)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "event": self.event,
            "key_id": self.key_id,
            "version": self.version,
            "verdict": self.verdict,
            "measurement": self.measurement,
            "rule": self.rule,
            "detail": self.detail,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the admin API: the fields plus both hashes as lowercase hex."""
        return {**self.fields(), "prev_hash": self.prev_hash.hex(), "hash": self.hash.hex()}


class ChainVerdict(NamedTuple):
    """Result of :func:`verify_chain`: ``first_bad`` is the seq of the first broken record."""

    ok: bool
    records: int
    first_bad: int | None


def chain_hash(prev_hash: bytes, fields: dict[str, Any]) -> bytes:
    """``SHA-256(prev_hash || canonical JSON of fields)`` as documented in the module docstring."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev_hash + canonical.encode("utf-8")).digest()


def verify_chain(records: Iterable[AuditRecord], *, head: tuple[int, bytes] | None = None) -> ChainVerdict:
    """Check that ``records`` (in storage order) form one unbroken chain from the genesis hash.

    Detects an edited record (its hash no longer matches its fields), a deleted or inserted
    one (the next ``prev_hash`` does not match), reordering (sequence numbers must increase
    and are hashed), and, with ``head`` (the stored ``(seq, hash)`` of the last record),
    removal of the newest records. ``records`` is the number of records read.
    """
    prev_hash = GENESIS_HASH
    prev_seq = 0
    count = 0
    first_bad: int | None = None
    for record in records:
        count += 1
        if first_bad is not None:
            continue
        expected = chain_hash(record.prev_hash, record.fields())
        if (
            record.seq <= prev_seq
            or not hmac.compare_digest(record.prev_hash, prev_hash)
            or not hmac.compare_digest(record.hash, expected)
        ):
            first_bad = record.seq
            continue
        prev_hash, prev_seq = record.hash, record.seq
    if first_bad is None and head is not None:
        head_seq, head_hash = head
        if head_seq != prev_seq or not hmac.compare_digest(head_hash, prev_hash):
            # The newest records are gone (first bad: the one after the last good one), records
            # were appended behind the head's back (first bad: the one after the head), or the
            # last record was rewritten with a recomputed hash (first bad: the last record).
            first_bad = prev_seq if head_seq == prev_seq else min(head_seq, prev_seq) + 1
    return ChainVerdict(first_bad is None, count, first_bad)
