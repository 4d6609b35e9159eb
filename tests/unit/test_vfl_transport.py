"""The vertical-FL job plan, the server's remote channel and the session, without sockets."""

from __future__ import annotations

import datetime
import decimal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import cbor2
import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl.plan import certificate_nonce
from enclaveml.fl.vertical._channel import PartyChannel, PartyEndpoint, answer, unwrap
from enclaveml.fl.vertical._codec import MessageError, decode, encode
from enclaveml.fl.vertical._errors import PartyFailedError, ProtocolError
from enclaveml.fl.vertical._remote import PartyGoneError, RemoteChannel
from enclaveml.fl.vertical._session import NotEnrolledError, VerticalSession, token_sha256
from enclaveml.fl.vertical.plan import VerticalPlan


def test_plan_round_trips_and_every_field_changes_the_digest() -> None:
    plan = VerticalPlan(
        task="train", parties=("bank", "insurer"), algorithm="boosting", params={"max_depth": 4}
    )
    again = VerticalPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.digest == plan.digest
    assert plan.label_party == "bank"
    assert list(plan.passive_parties) == ["insurer"]
    variants = [
        VerticalPlan(
            task="train", parties=("insurer", "bank"), algorithm="boosting", params={"max_depth": 4}
        ),
        VerticalPlan(task="train", parties=("bank", "insurer"), algorithm="logreg", params={"max_depth": 4}),
        VerticalPlan(
            task="train", parties=("bank", "insurer"), algorithm="boosting", params={"max_depth": 5}
        ),
        VerticalPlan(task="psi", parties=("bank", "insurer")),
    ]
    assert len({plan.digest, *(v.digest for v in variants)}) == 5
    # A vertical plan's nonce can never equal a horizontal plan's: the digests cover "kind".
    assert certificate_nonce(plan.digest) != certificate_nonce(b"\x00" * 32)


@pytest.mark.parametrize(
    "fields",
    [
        {"task": "steal", "parties": ("a", "b")},
        {"task": "psi", "parties": ("a",)},
        {"task": "psi", "parties": ("a", "a")},
        {"task": "psi", "parties": ("a", "b c")},
        {"task": "psi", "parties": ("a", "b"), "psi_mode": "plain"},
        {"task": "train", "parties": ("a", "b")},
        {"task": "predict", "parties": ("a", "b"), "algorithm": "boosting"},
        {"task": "predict", "parties": ("a", "b"), "algorithm": "logreg", "model_sha256": "0" * 64},
        {"task": "psi", "parties": ("a", "b"), "call_timeout_s": 0},
        {"task": "train", "parties": ("a", "b"), "algorithm": "logreg", "params": {"x": object()}},
    ],
)
def test_invalid_plans_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        VerticalPlan(**fields)


def test_from_dict_refuses_other_documents() -> None:
    with pytest.raises(ConfigurationError, match="kind"):
        VerticalPlan.from_dict({"v": 1, "strategy": {"name": "fedavg"}})
    with pytest.raises(ConfigurationError, match="lacks"):
        VerticalPlan.from_dict({"v": 1, "kind": "enclaveml-vertical-fl", "parties": ["a", "b"]})


def serve_party(channel: RemoteChannel, endpoint: PartyEndpoint, calls: int) -> threading.Thread:
    """A party loop without HTTP: fetch, answer, post — what party.py does over the network."""

    def loop() -> None:
        for _ in range(calls):
            pending = channel.next_call(5.0)
            assert pending is not None
            channel.answer(pending.id, answer(endpoint, pending.method, pending.request))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_remote_channel_round_trip_and_refusals() -> None:
    channel = RemoteChannel("p", call_timeout_s=5.0, record=True)
    endpoint = PartyEndpoint(
        "p", {"m.add": lambda p: {"sum": p["a"] + p["b"]}, "m.fail": lambda p: {"x": 1 // 0}}
    )
    thread = serve_party(channel, endpoint, 2)
    assert channel.call("m.add", {"a": 2, "b": 3}) == {"sum": 5}
    with pytest.raises(PartyFailedError, match="ZeroDivisionError"):
        channel.call("m.fail", {})
    thread.join(5)
    assert [e.method for e in channel.transcript] == ["m.add", "m.fail"]
    assert decode(channel.transcript[0].request) == {"a": 2, "b": 3}
    # An answer for no call in flight is refused and changes nothing.
    with pytest.raises(ProtocolError):
        channel.answer("0" * 32, b"\xa0")
    assert channel.next_call(0.01) is None


def test_a_wrong_call_id_is_refused_and_the_right_one_still_lands() -> None:
    channel = RemoteChannel("p", call_timeout_s=5.0)
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(channel.call("m.echo", {"v": 1})))
    caller.start()
    pending = channel.next_call(5.0)
    assert pending is not None
    with pytest.raises(ProtocolError):
        channel.answer(
            "f" * 32, answer(PartyEndpoint("p", {"m.echo": lambda p: {"v": 666}}), "m.echo", pending.request)
        )
    # Fetched again (e.g. after a dropped connection), answered once.
    assert channel.next_call(0.1) is pending
    channel.answer(pending.id, answer(PartyEndpoint("p", {"m.echo": lambda p: p}), "m.echo", pending.request))
    caller.join(5)
    assert result == [{"v": 1}]


def test_a_silent_party_times_out_and_a_closed_channel_fails_fast() -> None:
    channel = RemoteChannel("quiet", call_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(PartyGoneError, match="quiet"):
        channel.call("m.x", {})
    assert time.monotonic() - started < 2
    channel.close("the job has failed")
    with pytest.raises(PartyGoneError, match="failed"):
        channel.call("m.x", {})


def test_one_call_in_flight_per_party() -> None:
    channel = RemoteChannel("p", call_timeout_s=2.0)
    errors: list[BaseException] = []

    def call_and_keep_the_error() -> None:
        try:
            channel.call("m.a", {})
        except PartyGoneError as exc:
            errors.append(exc)

    first = threading.Thread(target=call_and_keep_the_error)
    first.start()
    assert channel.next_call(2.0) is not None
    with pytest.raises(ProtocolError, match="in flight"):
        channel.call("m.b", {})
    channel.close("done")
    first.join(5)
    assert len(errors) == 1


def test_session_authenticates_runs_the_job_and_reports_only_safe_text() -> None:
    plan = VerticalPlan(task="psi", parties=("a", "b"))
    tokens = {"a": "token-a", "b": "token-b"}
    secret = "row 17 has income 123456"

    def job(channels: Sequence[PartyChannel]) -> Any:
        raise KeyError(secret)  # a bug whose text holds data: parties must not see it

    session = VerticalSession(plan, {p: token_sha256(t) for p, t in tokens.items()}, job, connect_timeout_s=5)
    assert session.authenticate("token-b") == "b"
    with pytest.raises(NotEnrolledError):
        session.authenticate("token-c")
    session.start()
    for channel in session.channels.values():
        assert channel.next_call(0.01) is None  # connects
    assert session.wait(5)
    assert session.state == "failed"
    assert secret not in str(session.outcome())
    assert session.outcome()["error"].startswith("KeyError")
    with pytest.raises(ConfigurationError):
        VerticalSession(plan, {"a": token_sha256("x")}, job)


def test_session_fails_when_a_party_never_connects() -> None:
    plan = VerticalPlan(task="psi", parties=("a", "b"))
    session = VerticalSession(
        plan, {p: token_sha256(p) for p in plan.parties}, lambda c: None, connect_timeout_s=0.2
    )
    session.start()
    session.channels["a"].next_call(0.0)
    assert session.wait(5)
    assert session.state == "failed"
    assert "'b' did not connect" in session.outcome()["error"]


@pytest.mark.timeout(10)
def test_shared_cbor_references_are_refused_before_they_expand() -> None:
    """A few hundred bytes of CBOR shared references (tags 28/29) name the same list many times;
    copied once per use, eight-wide levels would grow to 8**10 lists. Refused at once."""
    inner: list[Any] = [1]
    for _ in range(10):
        inner = [inner] * 8
    message = cbor2.dumps({"x": inner}, value_sharing=True)
    assert len(message) < 1000
    started = time.monotonic()
    with pytest.raises(MessageError, match="tag 28"):  # shared references never reach the decoder
        decode(message)
    assert time.monotonic() - started < 1.0
    assert decode(cbor2.dumps({"x": [[1], [1]]}))["x"] == [[1], [1]]  # equal, not shared: fine


def test_a_plan_that_pins_the_party_credentials_takes_no_others(sim_verifier, sim_policy) -> None:
    from enclaveml.fl.vertical.party import ServerConnection

    tokens = {"bank": "token-bank", "insurer": "token-insurer"}
    pins = {p: token_sha256(t).hex() for p, t in tokens.items()}
    plan = VerticalPlan(task="psi", parties=("bank", "insurer"), credentials=pins)
    assert VerticalPlan.from_dict(plan.to_dict()) == plan
    assert plan.digest != VerticalPlan(task="psi", parties=("bank", "insurer")).digest
    assert "credentials" not in VerticalPlan(task="psi", parties=("bank", "insurer")).to_dict()
    session = VerticalSession(plan, {p: token_sha256(t) for p, t in tokens.items()}, lambda channels: None)
    assert session.authenticate("token-insurer") == "insurer"
    # The host puts a credential of its own in the passive party's place: refused at start.
    with pytest.raises(ConfigurationError, match="differ from those the plan names"):
        VerticalSession(
            plan, {"bank": token_sha256("token-bank"), "insurer": token_sha256("host")}, lambda c: None
        )
    # A party whose credential the plan does not name stops before it connects (port 9 is not dialled).
    with pytest.raises(ConfigurationError, match="not one the plan names"):
        ServerConnection(
            "https://127.0.0.1:9",
            credential="host",
            policy=sim_policy,
            verifier=sim_verifier,
            expected_plan=plan,
        )
    for credentials, message in [
        ({"bank": pins["bank"]}, "one credential for each party"),
        ({**pins, "telco": token_sha256("t").hex()}, "one credential for each party"),
        ({"bank": pins["bank"], "insurer": pins["bank"]}, "share one credential"),
        ({"bank": pins["bank"], "insurer": "x" * 64}, "64 lowercase hex"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            VerticalPlan(task="psi", parties=("bank", "insurer"), credentials=credentials)


def test_a_message_of_many_small_items_is_refused_before_it_is_decoded() -> None:
    # 8 MB of one-byte empty lists decoded to ~1.6 GB of Python objects; now refused by a walk of
    # the item heads that allocates nothing (in a child, so its peak memory is its own).
    code = (
        "import resource, time; from enclaveml.fl.vertical._codec import decode, MessageError\n"
        "n = 8_000_000; message = b'\\xa1\\x61x' + b'\\x9b' + n.to_bytes(8, 'big') + b'\\x80' * n\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; started = time.monotonic()\n"
        "try:\n    decode(message)\nexcept MessageError as e:\n    print(e)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(time.monotonic() - started, grown // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert "more than 262144 CBOR items" in out[0]
    seconds, grown_mib = out[1].split()
    assert float(seconds) < 2.0
    assert int(grown_mib) < 64


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"x": {1, 2}}, "tag 258"),  # a set
        ({"x": decimal.Decimal("1.5")}, "tag 4"),
        ({"x": 2**300}, "bignum"),  # one of at most 32 bytes is an int like any other
        ({"x": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}, "tag 0"),
        ({"x": uuid.UUID(int=1)}, "tag 37"),
        ({"x": cbor2.CBORSimpleValue(99)}, "unexpected CBOR value"),
        ({"x": cbor2.undefined}, "unexpected CBOR value"),
    ],
)
def test_only_plain_values_and_arrays_reach_protocol_code(value: dict[str, Any], match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode(cbor2.dumps(value, canonical=True))


def test_malformed_heads_shapes_and_error_fields_are_message_errors() -> None:
    good = encode({"a": np.arange(3)})
    for message, match in [
        (good + b"\x00", "bytes after"),
        (b"\xbf\x61a\x01\xff", "not canonical"),  # an indefinite-length map
        (good[:-2], "not valid CBOR"),
        (b"\xa1\x61a\x9b" + (2**63).to_bytes(8, "big"), "not valid CBOR"),  # a count beyond the data
        (b"\xa1\x61a" + b"\x81" * 40 + b"\x00", "nested too deeply"),
        (
            cbor2.dumps({"a": cbor2.CBORTag(40, [[0, 2**62, 2**62], cbor2.CBORTag(64, b"")])}),
            "below 2\\*\\*40",
        ),
    ]:
        with pytest.raises(MessageError, match=match):
            decode(message)
    for not_text in (2**63, b"\x00" * 5, [1]):  # a huge integer once raised a bare ValueError here
        with pytest.raises(PartyFailedError, match="not an error type name"):
            unwrap("a", "m", encode({"error": not_text}))
    with pytest.raises(PartyFailedError, match="KeyError"):
        unwrap("a", "m", encode({"error": "KeyError"}))


def test_the_pre_scan_takes_what_the_format_allows() -> None:
    # Arrays at the deepest level of lists the format allows (15 lists below the message's map).
    deep: Any = np.arange(3.0)
    for _ in range(15):
        deep = [deep]
    assert decode(encode({"x": deep}))["x"]  # the walk counts no tag and no array internals
    with pytest.raises(MessageError, match="nested too deeply"):
        decode(encode({"x": [deep]}))
    # Integers beyond 64 bits (bignums), as a seed in a model's parameters may be.
    assert decode(encode({"seed": 2**64, "low": -(2**64) - 1}))["seed"] == 2**64
    with pytest.raises(MessageError, match="bignum"):
        decode(cbor2.dumps({"x": 2**300}))
    with pytest.raises(MessageError, match="inside a tag"):
        decode(b"\xa1\x61x" + b"\xd8\x40" * 3 + b"\x40")
    values = {"f16": 1.5, "f64": 1e300, "neg": -17, "empty": {}, "s": "", "b": b"\x00" * (1 << 20)}
    assert decode(encode(values)) == values


def test_a_stored_model_of_many_items_still_loads() -> None:
    message = encode({"trees": [[1, 2, 3]] * 100_000})  # 400,000 items: over a message's budget
    with pytest.raises(MessageError, match="more than"):
        decode(message)
    assert len(decode(message, max_items=None)["trees"]) == 100_000
