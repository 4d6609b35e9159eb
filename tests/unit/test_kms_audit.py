"""The audit log's hash chain: the documented hash, and detection of every kind of tampering."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from enclaveml.kms._audit import GENESIS_HASH, AuditEvent, AuditRecord, chain_hash, verify_chain


def _chain(n: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        event = AuditEvent(
            1_700_000_000.25 + seq,
            "release" if seq % 2 else "key.create",
            "released" if seq % 2 else "ok",
            key_id=f"key-{seq}",
            version=seq,
            measurement="ab" * 48 if seq % 2 else None,
            rule=None,
            detail=f"event {seq}",
        )
        record = AuditRecord.seal(seq, event, prev)
        records.append(record)
        prev = record.hash
    return records


def test_hash_is_sha256_of_prev_hash_and_canonical_json_as_documented() -> None:
    event = AuditEvent(1700000000.1234, "release", "denied", key_id="k", version=2, rule="nonce", detail="d")
    record = AuditRecord.seal(1, event, GENESIS_HASH)
    canonical = (
        '{"detail":"d","event":"release","key_id":"k","measurement":null,"rule":"nonce",'
        '"seq":1,"time":1700000000.123,"verdict":"denied","version":2}'
    )
    assert record.prev_hash == bytes(32)
    assert record.hash == hashlib.sha256(bytes(32) + canonical.encode()).digest()
    assert chain_hash(GENESIS_HASH, record.fields()) == record.hash
    as_json = record.to_dict()
    assert as_json["hash"] == record.hash.hex()
    assert as_json["prev_hash"] == "00" * 32
    json.dumps(as_json)  # JSON-ready


def test_intact_chain_verifies_with_head() -> None:
    records = _chain(5)
    verdict = verify_chain(records, head=(5, records[-1].hash))
    assert verdict == (True, 5, None)
    assert verdict.ok
    assert verdict.records == 5
    assert verdict.first_bad is None
    assert verify_chain([]) == (True, 0, None)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("detail", "nothing to see"), ("verdict", "denied"), ("measurement", "cd" * 48), ("time", 1.0)],
)
def test_edited_record_is_detected(field_name: str, value: object) -> None:
    records = _chain(5)
    records[2] = dataclasses.replace(records[2], **{field_name: value})
    assert verify_chain(records) == (False, 5, 3)


def test_edit_with_recomputed_hash_breaks_the_next_link() -> None:
    records = _chain(5)
    forged = dataclasses.replace(records[1], verdict="released")
    records[1] = dataclasses.replace(forged, hash=chain_hash(forged.prev_hash, forged.fields()))
    assert verify_chain(records) == (False, 5, 3)


def test_deleted_record_is_detected() -> None:
    records = _chain(5)
    del records[2]
    assert verify_chain(records) == (False, 4, 4)


def test_deleted_first_record_is_detected() -> None:
    assert verify_chain(_chain(3)[1:]) == (False, 2, 2)


def test_inserted_record_is_detected() -> None:
    records = _chain(5)
    intruder = AuditRecord.seal(3, AuditEvent(1.0, "release", "released", key_id="k"), records[1].hash)
    records.insert(2, intruder)
    verdict = verify_chain(records)
    assert not verdict.ok
    assert verdict.first_bad == 3


def test_reordered_records_are_detected() -> None:
    records = _chain(5)
    records[1], records[2] = records[2], records[1]
    assert verify_chain(records) == (False, 5, 3)


def test_renumbered_record_is_detected() -> None:
    records = _chain(4)
    records[3] = dataclasses.replace(records[3], seq=9)
    assert verify_chain(records).first_bad == 9


def test_truncated_tail_is_detected_only_with_the_head() -> None:
    records = _chain(5)
    head = (5, records[-1].hash)
    assert verify_chain(records[:3]).ok  # the prefix of a chain is a valid chain...
    assert verify_chain(records[:3], head=head) == (False, 3, 4)  # ...but not the stored head
    assert verify_chain([], head=head) == (False, 0, 1)


def test_records_appended_behind_the_heads_back_are_detected() -> None:
    records = _chain(5)
    assert verify_chain(records, head=(3, records[2].hash)) == (False, 5, 4)


def test_rewritten_last_record_is_detected_by_the_head() -> None:
    records = _chain(3)
    forged = dataclasses.replace(records[2], verdict="denied")
    records[2] = dataclasses.replace(forged, hash=chain_hash(forged.prev_hash, forged.fields()))
    assert verify_chain(records, head=(3, _chain(3)[2].hash)) == (False, 3, 3)


def test_event_time_is_rounded_and_detail_bounded() -> None:
    event = AuditEvent(12.34567, "x", "ok", detail="y" * 2000)
    assert event.time == 12.346
    assert len(event.detail) == 500
    assert event.detail.endswith("...")
