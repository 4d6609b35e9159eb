"""PSI: both modes give the same aligned rows; the server never sees an ID; bad messages are refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from enclaveml.crypto import KeyHandle
from enclaveml.errors import ConfigurationError, EnclaveMLError
from enclaveml.fl.vertical._channel import InProcessChannel, PartyChannel
from enclaveml.fl.vertical._codec import Payload, decode, encode
from enclaveml.fl.vertical._errors import MessageError, PartyFailedError, ProtocolError
from enclaveml.fl.vertical._psi_tee import intersect_sorted
from enclaveml.fl.vertical.psi import PsiParty, PsiSummary, run_psi

MODES = ("tee", "ecdh")


@pytest.fixture(scope="module")
def key() -> KeyHandle:
    return KeyHandle.generate("vfl-psi")


def canaries(rng: np.random.Generator, n: int, prefix: str) -> list[str]:
    """Distinct IDs long enough that none can turn up by chance in random bytes."""
    return [f"{prefix}-{v:016x}-canary" for v in rng.choice(2**62, size=n, replace=False)]


def shuffled(rng: np.random.Generator, *parts: list[str]) -> list[str]:
    ids = [i for part in parts for i in part]
    return [ids[j] for j in rng.permutation(len(ids))]


def run(parties: Sequence[PsiParty], mode: str) -> tuple[PsiSummary, list[InProcessChannel]]:
    channels = [InProcessChannel(p) for p in parties]
    return run_psi(channels, mode), channels  # type: ignore[arg-type]


def aligned(ids: Sequence[object], party: PsiParty) -> list[object]:
    return [ids[i] for i in party.aligned_rows]


def three_sets(rng: np.random.Generator, core: int = 120) -> tuple[list[list[str]], list[str]]:
    """Three parties: a core in all three, pairs in two only, and IDs of their own."""
    common = canaries(rng, core, "all")
    ab, bc, ac = canaries(rng, 40, "ab"), canaries(rng, 30, "bc"), canaries(rng, 20, "ac")
    sets = [
        shuffled(rng, common, ab, ac, canaries(rng, 200, "a")),
        shuffled(rng, common, ab, bc, canaries(rng, 90, "b")),
        shuffled(rng, common, bc, ac, canaries(rng, 10, "c")),
    ]
    return sets, common


@pytest.mark.parametrize("mode", MODES)
def test_three_parties_align_on_the_common_ids_only(key: KeyHandle, mode: str) -> None:
    sets, common = three_sets(np.random.default_rng(1))
    parties = [PsiParty(name, ids, key=key, parties=3) for name, ids in zip("abc", sets, strict=True)]
    summary, _ = run(parties, mode)
    assert summary == PsiSummary(mode, ("a", "b", "c"), (380, 280, 180), 120)  # type: ignore[arg-type]
    expected = sorted(common, key=str.encode)
    for ids, party in zip(sets, parties, strict=True):
        assert aligned(ids, party) == expected
        assert party.intersection_size == 120
        assert not party.aligned_rows.flags.writeable


def test_both_modes_give_every_party_the_same_rows_in_the_same_order(key: KeyHandle) -> None:
    rng = np.random.default_rng(2)
    common = canaries(rng, 1500, "both")
    a = shuffled(rng, common, canaries(rng, 1000, "a"))
    b = shuffled(rng, canaries(rng, 500, "b"), common)
    rows: dict[str, list[np.ndarray]] = {}
    for mode in MODES:  # one run per PsiParty: new ones for each mode
        parties = [PsiParty("a", a, key=key, parties=2), PsiParty("b", b, key=key, parties=2)]
        summary, _ = run(parties, mode)
        assert summary.intersection_size == 1500
        rows[mode] = [p.aligned_rows.copy() for p in parties]
    for tee, ecdh in zip(rows["tee"], rows["ecdh"], strict=True):
        np.testing.assert_array_equal(tee, ecdh)
    assert aligned(a, parties[0]) == aligned(b, parties[1]) == sorted(common)
    # The rows really are positions in each party's own list, which differ between parties.
    assert not np.array_equal(rows["tee"][0], rows["tee"][1])


def as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["int", "bytes", "int and str"])
def test_every_id_kind_aligns_by_its_canonical_bytes(key: KeyHandle, mode: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    a_ints = [int(v) for v in rng.choice(10**6, size=300, replace=False)]
    b_ints = a_ints[:100] + [int(v) + 10**7 for v in rng.choice(10**6, size=50, replace=False)]
    a: list[object] = list(a_ints)
    b: list[object] = list(b_ints)
    if kind == "bytes":  # with NUL bytes, which numpy's fixed-width strings would drop at the end
        a = [b"\x00" + as_bytes(v) + b"\x00" for v in a_ints]
        b = [b"\x00" + as_bytes(v) + b"\x00" for v in b_ints]
    elif kind == "int and str":  # one party's IDs are numbers, the other's their decimal strings
        b = [str(v) for v in b_ints]
    # numpy arrays of ints or str are accepted as they are
    parties = [
        PsiParty("a", a, key=key, parties=2),
        PsiParty("b", b if kind == "bytes" else np.asarray(b), key=key, parties=2),
    ]
    summary, _ = run(parties, mode)
    assert summary.intersection_size == 100
    expected = sorted(as_bytes(v) for v in a[:100])
    assert [as_bytes(v) for v in aligned(a, parties[0])] == expected
    assert [as_bytes(v) for v in aligned(b, parties[1])] == expected


def test_int_ids_sort_by_their_decimal_bytes_not_by_value(key: KeyHandle) -> None:
    ids = [9, 100, 10, 1, 1000]
    parties = [PsiParty("a", ids, key=key, parties=2), PsiParty("b", list(reversed(ids)), key=key, parties=2)]
    run(parties, "tee")
    assert aligned(ids, parties[0]) == [1, 10, 100, 1000, 9]


@pytest.mark.parametrize("mode", MODES)
def test_disjoint_subset_and_empty_sets(key: KeyHandle, mode: str) -> None:
    rng = np.random.default_rng(4)
    a, b = canaries(rng, 200, "a"), canaries(rng, 150, "b")
    parties = [PsiParty("a", a, key=key, parties=2), PsiParty("b", b, key=key, parties=2)]
    summary, _ = run(parties, mode)
    assert summary.intersection_size == 0
    assert all(p.aligned_rows.shape == (0,) for p in parties)

    subset = [a[i] for i in rng.permutation(200)[:60]]
    parties = [PsiParty("a", a, key=key, parties=2), PsiParty("sub", subset, key=key, parties=2)]
    summary, _ = run(parties, mode)
    assert summary.intersection_size == 60
    assert sorted(parties[1].aligned_rows.tolist()) == list(range(60))
    assert aligned(a, parties[0]) == aligned(subset, parties[1]) == sorted(subset)

    parties = [PsiParty("a", a, key=key, parties=2), PsiParty("none", [], key=key, parties=2)]
    summary, _ = run(parties, mode)
    assert summary.set_sizes == (200, 0)
    assert summary.intersection_size == 0


def leaks(ids: Sequence[bytes], blobs: Sequence[bytes]) -> list[bytes]:
    return [i for i in ids if any(i in blob for blob in blobs)]


@pytest.mark.parametrize("mode", MODES)
def test_the_server_never_receives_a_raw_id_or_the_key(key: KeyHandle, mode: str) -> None:
    rng = np.random.default_rng(5)
    sets, _ = three_sets(rng, core=80)
    parties = [PsiParty(name, ids, key=key, parties=3) for name, ids in zip("abc", sets, strict=True)]
    _, channels = run(parties, mode)
    received = [x.response for ch in channels for x in ch.transcript]
    assert received
    all_ids = [i.encode() for ids in sets for i in ids]
    # The search does find an ID that is there: a control for the assertion below.
    assert leaks(all_ids, [encode({"oops": all_ids[7]})]) == [all_ids[7]]
    assert leaks(all_ids, received) == []
    assert not any(key.secret_bytes() in blob for blob in received)
    fields = {name for blob in received for name in decode(blob).get("ok", {})}
    expected = {"tags", "confirm"} if mode == "tee" else {"blinded", "setup", "reblinded", "size"}
    assert fields == expected
    if mode == "ecdh":  # the relay forwards blinded points, never IDs, in both directions
        assert leaks(all_ids, [x.request for ch in channels for x in ch.transcript]) == []


def test_a_party_with_another_key_finds_nothing_and_nothing_fails(key: KeyHandle) -> None:
    sets, _ = three_sets(np.random.default_rng(6))
    other = KeyHandle.generate("vfl-psi")
    parties = [PsiParty("a", sets[0], key=key, parties=2), PsiParty("b", sets[1], key=other, parties=2)]
    summary, _ = run(parties, "tee")
    assert summary.intersection_size == 0
    assert all(len(p.aligned_rows) == 0 for p in parties)
    parties = [PsiParty(n, ids, key=k) for n, ids, k in zip("abc", sets, [key, key, other], strict=True)]
    assert run(parties, "tee")[0].intersection_size == 0


def test_tee_mode_needs_a_key_at_every_party(key: KeyHandle) -> None:
    parties = [PsiParty("a", ["x-id", "y-id"], key=key, parties=2), PsiParty("b", ["x-id"])]
    with pytest.raises(PartyFailedError, match="ConfigurationError"):
        run(parties, "tee")
    parties = [PsiParty("a", ["x-id", "y-id"], parties=2), PsiParty("b", ["x-id"])]
    assert run(parties, "ecdh")[0].intersection_size == 1  # the cryptographic mode needs none
    with pytest.raises(ConfigurationError):
        PsiParty("c", ["x"], key=b"\x00" * 32)  # type: ignore[arg-type]


def test_tags_of_two_runs_are_unlinkable(key: KeyHandle) -> None:
    ids = canaries(np.random.default_rng(7), 50, "run")
    parties = [PsiParty("a", ids, key=key, parties=2), PsiParty("b", ids, key=key, parties=2)]
    first = run(parties, "tee")[1][0].transcript[0].response
    parties = [PsiParty("a", ids, key=key), PsiParty("b", ids, key=key)]
    second = run(parties, "tee")[1][0].transcript[0].response
    tags = [set(map(bytes, decode(r)["ok"]["tags"])) for r in (first, second)]
    assert tags[0].isdisjoint(tags[1])


SECRET = "secret-customer-0042-canary"


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([SECRET, "b", SECRET], "repeated"),
        ([7, np.int64(7)], "repeated"),
        ([SECRET, 7], "one kind"),
        ([True, False], "one kind"),
        ([b"x", SECRET], "one kind"),
        ([1.5, 2.5], "one kind"),
        (["ok", "\ud800"], "position 1"),
        (SECRET, "not one string"),
    ],
)
def test_bad_ids_are_refused_without_echoing_them(ids: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as caught:
        PsiParty("a", ids)  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)
    assert "7" not in str(caught.value)


def test_aligned_rows_exist_only_after_a_finished_run(key: KeyHandle) -> None:
    party = PsiParty("a", ["p-id", "q-id"], key=key)
    with pytest.raises(ProtocolError):
        _ = party.aligned_rows
    run([party, PsiParty("b", ["q-id"], key=key)], "tee")
    assert party.intersection_size == 1
    with pytest.raises(ProtocolError, match="one run per PsiParty"):  # no second run, no reset
        party.handle("psi.hashes", {"session": b"\x01" * 32})
    assert party.intersection_size == 1
    with pytest.raises(ConfigurationError):
        run_psi([InProcessChannel(party)], "tee")
    with pytest.raises(ConfigurationError):
        run_psi([InProcessChannel(party), InProcessChannel(PsiParty("b", ["q-id"]))], "rsa")  # type: ignore[arg-type]


class Tampering:
    """A channel whose party's answers to ``method`` pass through ``tamper`` on their way to the server."""

    def __init__(self, party: PsiParty, method: str, tamper: Callable[[Payload], Payload]) -> None:
        self.inner = InProcessChannel(party)
        self.method, self.tamper = method, tamper

    @property
    def name(self) -> str:
        return self.inner.name

    def call(self, method: str, payload: Payload) -> Payload:
        answer = self.inner.call(method, payload)
        return self.tamper(dict(answer)) if method == self.method else answer


def _tags(edit: Callable[[np.ndarray], object]) -> Callable[[Payload], Payload]:
    return lambda answer: {**answer, "tags": edit(np.array(answer["tags"]))}


def _set(field: str, value: object) -> Callable[[Payload], Payload]:
    return lambda answer: {**answer, field: value}


def _points(field: str, edit: Callable[[np.ndarray], object]) -> Callable[[Payload], Payload]:
    return lambda answer: {**answer, field: edit(np.array(answer[field]))}


def _bad_prefix(points: np.ndarray) -> np.ndarray:
    points[0, 0] = 4
    return points


MALFORMED = [
    ("tee", "psi.hashes", _tags(lambda t: t[::-1]), "not sorted"),
    ("tee", "psi.hashes", _tags(lambda t: np.concatenate([t[:1], t])), "not sorted"),
    ("tee", "psi.hashes", _tags(lambda t: t[:, :8]), "8 bytes"),
    ("tee", "psi.hashes", _tags(lambda t: t.astype(np.int64)), "uint8"),
    ("tee", "psi.hashes", _tags(lambda t: t.reshape(-1)), "uint8"),
    ("tee", "psi.hashes", _set("tags", b"not an array"), "uint8"),
    ("tee", "psi.result", _set("confirm", b"short"), "confirmation"),
    ("tee", "psi.result", _set("confirm", b"\x00" * 32), "do not confirm"),
    ("ecdh", "psi.ecdh.blind", _points("blinded", lambda p: p[:-1]), "wrong number"),
    ("ecdh", "psi.ecdh.blind", _points("blinded", _bad_prefix), "not compressed"),
    ("ecdh", "psi.ecdh.answer", _points("reblinded", lambda p: p[:-1]), "wrong number"),
    ("ecdh", "psi.ecdh.answer", _points("setup", lambda p: p[:, :32]), "33-byte"),
    ("ecdh", "psi.ecdh.answer", _points("setup", lambda p: p.astype(np.uint16)), "uint8"),
    ("ecdh", "psi.ecdh.finalise", _set("size", -1), "intersection size"),
    ("ecdh", "psi.ecdh.finalise", _set("size", 3), "another intersection size"),
]


@pytest.mark.parametrize(("mode", "method", "tamper", "match"), MALFORMED)
@pytest.mark.parametrize("tampered", [0, 1])
def test_malformed_answers_raise_protocol_error(
    key: KeyHandle, mode: str, method: str, tamper: Callable[[Payload], Payload], match: str, tampered: int
) -> None:
    rng = np.random.default_rng(8)
    common = canaries(rng, 30, "c")
    sets = [shuffled(rng, common, canaries(rng, 20, "a")), shuffled(rng, common, canaries(rng, 10, "b"))]
    parties = [PsiParty(name, ids, key=key, parties=2) for name, ids in zip("ab", sets, strict=True)]
    channels: list[PartyChannel] = [InProcessChannel(p) for p in parties]
    channels[tampered] = Tampering(parties[tampered], method, tamper)
    expected: type[Exception] = ProtocolError
    if (method, match, tampered) == ("psi.ecdh.blind", "wrong number", 0):
        # The relay cannot know the coordinator's set size: the coordinator itself refuses the
        # answers to its shortened request.
        expected, match = PartyFailedError, "MessageError"
    elif (method, match, tampered) == ("psi.ecdh.finalise", "another intersection size", 0):
        match = "wrong number"  # the coordinator's final set then has another size than it said
    with pytest.raises(expected, match=match) as caught:
        run_psi(channels, mode)  # type: ignore[arg-type]
    assert f"'{'ab'[tampered]}'" in str(caught.value)
    assert not any(i in str(caught.value) for i in common)


def test_a_party_refuses_a_malformed_or_out_of_turn_tee_result(key: KeyHandle) -> None:
    party = PsiParty("a", canaries(np.random.default_rng(9), 10, "a"), key=key)
    session = b"\x02" * 32
    with pytest.raises(ProtocolError):  # no upload yet in this session
        party.handle("psi.result", {"session": session, "positions": np.arange(2), "size": 2})
    party.handle("psi.hashes", {"session": session})
    with pytest.raises(ProtocolError):  # tags go once per session
        party.handle("psi.hashes", {"session": session})
    bad: list[Payload] = [
        {"session": session[:5], "positions": np.arange(2), "size": 2},
        {"session": session, "positions": np.array([3, 10]), "size": 2},
        {"session": session, "positions": np.array([-1, 3]), "size": 2},
        {"session": session, "positions": np.array([4, 3]), "size": 2},
        {"session": session, "positions": np.array([3, 3]), "size": 2},
        {"session": session, "positions": np.array([3, 4], np.int32), "size": 2},
        {"session": session, "positions": np.array([[3, 4]]), "size": 2},
        {"session": session, "positions": np.array([3, 4]), "size": 3},
        {"session": session, "positions": [3, 4], "size": 2},
    ]
    for payload in bad:
        with pytest.raises(MessageError):
            party.handle("psi.result", payload)
    with pytest.raises(ProtocolError):
        party.handle("psi.result", {"session": b"\x03" * 32, "positions": np.arange(2), "size": 2})
    party.handle("psi.result", {"session": session, "positions": np.array([3, 4]), "size": 2})
    assert party.intersection_size == 2
    with pytest.raises(ProtocolError):  # once
        party.handle("psi.result", {"session": session, "positions": np.array([3, 4]), "size": 2})


def test_a_party_follows_the_ecdh_steps_in_order_only() -> None:
    ids = canaries(np.random.default_rng(10), 8, "a")
    session, base = b"\x04" * 32, {"session": b"\x04" * 32}
    party = PsiParty("a", ids, key=KeyHandle.generate("vfl-psi"), parties=2)
    for method in ("psi.ecdh.intersect", "psi.ecdh.finalise"):
        with pytest.raises(ProtocolError):
            party.handle(method, base)
    with pytest.raises(ProtocolError):  # a member's set is not answered before the coordinator's
        party.handle(
            "psi.ecdh.answer", {**base, "over": "intersection", "blinded": np.zeros((0, 33), np.uint8)}
        )
    blinded = party.handle("psi.ecdh.blind", base)["blinded"]
    assert blinded.shape == (8, 33)
    with pytest.raises(ProtocolError):
        party.handle("psi.ecdh.blind", base)
    with pytest.raises(ProtocolError):  # the coordinator does not answer over all its IDs
        party.handle("psi.ecdh.answer", {**base, "over": "all", "blinded": blinded})
    with pytest.raises(ProtocolError):
        party.handle("psi.ecdh.finalise", base)  # nothing intersected yet
    with pytest.raises(ProtocolError):
        party.handle("psi.hashes", base)  # nothing of the other mode in this session

    member = PsiParty("m", ids[:5])
    answer = member.handle("psi.ecdh.answer", {**base, "over": "all", "blinded": blinded})
    with pytest.raises(ProtocolError):  # once
        member.handle("psi.ecdh.answer", {**base, "over": "all", "blinded": blinded})
    with pytest.raises(MessageError):
        member.handle("psi.ecdh.answer", {**base, "over": "some", "blinded": blinded})
    garbage = np.array(answer["reblinded"])
    garbage[:, 1:] = 0xFF
    with pytest.raises(ProtocolError, match="not curve points"):
        party.handle("psi.ecdh.intersect", {**base, "setup": answer["setup"], "reblinded": garbage})
    with pytest.raises(MessageError, match="sorted"):
        party.handle("psi.ecdh.intersect", {**base, "setup": answer["setup"][::-1], "reblinded": garbage})
    with pytest.raises(MessageError):
        party.handle("psi.ecdh.intersect", {**base, "setup": answer["setup"], "reblinded": garbage[:3]})
    party.handle("psi.ecdh.intersect", {**base, "setup": answer["setup"], "reblinded": answer["reblinded"]})
    assert party.handle("psi.ecdh.finalise", base) == {"size": 5}
    assert sorted(aligned(ids, party)) == sorted(ids[:5])
    request = member.handle("psi.ecdh.blind", base)["blinded"]
    final = {**base, "over": "intersection", "blinded": request}
    party.handle("psi.ecdh.answer", final)
    with pytest.raises(ProtocolError):  # one final answer per member it intersected with
        party.handle("psi.ecdh.answer", final)
    with pytest.raises(ProtocolError):
        party.handle("psi.ecdh.intersect", {"session": b"\x05" * 32})
    assert session == base["session"]


def test_errors_crossing_to_the_server_name_only_the_type(key: KeyHandle) -> None:
    party = PsiParty("a", [SECRET], key=key)
    channel = InProcessChannel(party)
    channel.call("psi.hashes", {"session": b"\x00" * 32})
    with pytest.raises(PartyFailedError, match="MessageError") as caught:
        channel.call("psi.result", {"session": b"\x00" * 32, "positions": [SECRET.encode()], "size": 1})
    assert SECRET not in str(caught.value)
    assert SECRET.encode() not in channel.transcript[-1].response
    assert isinstance(caught.value, EnclaveMLError)


def test_the_server_intersection_is_exact_on_crafted_tags() -> None:
    # Tags sharing their first 8 bytes, and tags that differ only in trailing zero bytes.
    raw = [
        [b"\x00" * 16, b"\x00" * 15 + b"\x01", b"A" * 8 + b"\x00" * 8, b"A" * 8 + b"\x00" * 7 + b"\xff"],
        [b"\x00" * 15 + b"\x01", b"A" * 8 + b"\x00" * 8, b"A" * 8 + b"\x00" * 7 + b"\x80", b"\xff" * 16],
        [b"\x00" * 16, b"\x00" * 15 + b"\x01", b"A" * 8 + b"\x00" * 8],
    ]
    sets = [np.frombuffer(b"".join(sorted(r)), "S16") for r in raw]
    positions = intersect_sorted(sets)
    assert [p.tolist() for p in positions] == [[1, 2], [0, 1], [1, 2]]
    assert [p.tolist() for p in intersect_sorted([sets[0], sets[0][:0]])] == [[], []]


def test_an_untrusted_relay_gets_no_extra_look_in_ecdh_mode() -> None:
    ids = canaries(np.random.default_rng(12), 8, "r")
    real, probe = {"session": b"\x06" * 32}, {"session": b"\x07" * 32}
    coordinator, member = PsiParty("a", ids, parties=2), PsiParty("m", ids[:5])
    # A session of the relay's own before the real one: the member answers it, but then takes
    # part in no other, so the real run fails instead of aligning as if nothing had happened.
    guesses = PsiParty("relay", ids, parties=2).handle("psi.ecdh.blind", probe)["blinded"]
    member.handle("psi.ecdh.answer", {**probe, "over": "all", "blinded": guesses})
    blinded = coordinator.handle("psi.ecdh.blind", real)["blinded"]
    with pytest.raises(ProtocolError, match="one run per PsiParty"):
        member.handle("psi.ecdh.answer", {**real, "over": "all", "blinded": blinded})
    # In the real run, a member's answer replayed (or one the relay makes up) is one intersect too
    # many for a plan of two parties: no extra answer over the intersection can be had.
    member = PsiParty("m", ids[:5])
    answer = member.handle("psi.ecdh.answer", {**real, "over": "all", "blinded": blinded})
    step3 = {**real, "setup": answer["setup"], "reblinded": answer["reblinded"]}
    coordinator.handle("psi.ecdh.intersect", step3)
    with pytest.raises(ProtocolError, match="once per member"):
        coordinator.handle("psi.ecdh.intersect", step3)
    assert coordinator.handle("psi.ecdh.finalise", real) == {"size": 5}
    request = member.handle("psi.ecdh.blind", real)["blinded"]
    coordinator.handle("psi.ecdh.answer", {**real, "over": "intersection", "blinded": request})
    with pytest.raises(ProtocolError):
        coordinator.handle("psi.ecdh.answer", {**real, "over": "intersection", "blinded": request})


def test_a_coordinator_needs_the_plan_s_party_count_and_every_member() -> None:
    ids = canaries(np.random.default_rng(13), 6, "k")
    session = {"session": b"\x08" * 32}
    unsure = PsiParty("a", ids)  # no parties= : it can be a member, not the coordinator
    blinded = unsure.handle("psi.ecdh.blind", session)["blinded"]
    answer = PsiParty("m", ids).handle("psi.ecdh.answer", {**session, "over": "all", "blinded": blinded})
    step3 = {**session, "setup": answer["setup"], "reblinded": answer["reblinded"]}
    with pytest.raises(ProtocolError, match="cannot coordinate"):
        unsure.handle("psi.ecdh.intersect", step3)
    three = PsiParty("a", ids, parties=3)
    blinded = three.handle("psi.ecdh.blind", session)["blinded"]
    answer = PsiParty("m", ids).handle("psi.ecdh.answer", {**session, "over": "all", "blinded": blinded})
    three.handle(
        "psi.ecdh.intersect", {**session, "setup": answer["setup"], "reblinded": answer["reblinded"]}
    )
    with pytest.raises(ProtocolError, match="every member"):  # a member left out by the relay
        three.handle("psi.ecdh.finalise", session)
    with pytest.raises(ConfigurationError):
        PsiParty("a", ids, parties=1)


def test_a_plan_bound_on_set_sizes_bounds_the_guesses_a_relay_can_test() -> None:
    from enclaveml.fl.vertical.plan import VerticalPlan

    plan = VerticalPlan(task="psi", parties=("a", "m"), psi_mode="ecdh", psi_max_ids=10)
    assert VerticalPlan.from_dict(plan.to_dict()).psi_max_ids == 10
    assert plan.digest != VerticalPlan(task="psi", parties=("a", "m"), psi_mode="ecdh").digest
    with pytest.raises(ConfigurationError):
        VerticalPlan(task="psi", parties=("a", "m"), psi_max_ids=0)
    ids = canaries(np.random.default_rng(14), 8, "g")
    with pytest.raises(ConfigurationError, match="more than the plan's 5"):
        PsiParty("a", ids, parties=2, max_ids=5)
    # An honest run within the bound aligns as before.
    parties = [PsiParty("a", ids, parties=2, max_ids=10), PsiParty("m", ids[:5], max_ids=10)]
    assert run(parties, "ecdh")[0].intersection_size == 5
    # A relay's request of 11 guesses (here: the blinded IDs of a party of its own) is refused.
    session = {"session": b"\x09" * 32}
    guesses = PsiParty("relay", canaries(np.random.default_rng(15), 11, "x"), parties=2).handle(
        "psi.ecdh.blind", session
    )["blinded"]
    with pytest.raises(ProtocolError, match="more than the plan's 10"):
        PsiParty("m", ids[:5], max_ids=10).handle(
            "psi.ecdh.answer", {**session, "over": "all", "blinded": guesses}
        )


@pytest.mark.parametrize("mode", ["tee", "ecdh"])
def test_the_server_enforces_the_plan_bound_on_every_set(key: KeyHandle, mode: str) -> None:
    """A party that ignores psi_max_ids (tags a whole ID space) fails the run at the server."""
    honest = canaries(np.random.default_rng(21), 8, "h")
    guesses = honest + canaries(np.random.default_rng(22), 40, "g")  # more than the plan's 10
    options = {"key": key} if mode == "tee" else {}
    greedy = PsiParty("m", guesses, **options)  # built without the plan's bound: it ignores it
    parties = [PsiParty("a", honest, parties=2, max_ids=10, **options), greedy]
    channels = [InProcessChannel(p) for p in parties]
    with pytest.raises(ProtocolError, match="the plan allows at most 10"):
        run_psi(channels, mode, max_ids=10)  # type: ignore[arg-type]
    assert run_psi(
        [InProcessChannel(PsiParty(n, honest, parties=2, **options)) for n in "ab"], mode, max_ids=10
    )
