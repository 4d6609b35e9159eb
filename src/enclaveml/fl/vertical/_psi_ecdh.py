"""Cryptographic-mode PSI: ECDH-PSI (openmined-psi) between the parties, the server as a relay.

The protocol and who learns what are in :mod:`enclaveml.fl.vertical.psi`. This module holds
:class:`EcdhRun` (a party's state during one run) and :func:`run_ecdh` (the relay).

openmined-psi 2.0.4 (``private_set_intersection.python``) does the cryptography: P-256, IDs hashed to
the curve with SHA-256, every blinded value a 33-byte compressed point. Its ``DataStructure.RAW``
setup (the PSI server's blinded set, sorted by the library) keeps the result exact: no Bloom-filter
or GCS false positives, so both PSI modes give the same intersection. Its protobuf messages are
not sent as they are: every list of points crosses as an ``(n, 33)`` uint8 array, so that the relay
and the parties check counts and shapes before any point reaches the library, and the library's
own parser never sees input from the network.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import private_set_intersection.python as _openmined
from numpy.typing import NDArray

from enclaveml.fl.vertical._channel import PartyChannel, call_all, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import MessageError, ProtocolError
from enclaveml.fl.vertical._psi_ids import Rows, check_set_size

__all__ = ["POINT_SIZE", "EcdhRun", "run_ecdh"]

POINT_SIZE = 33
# The library's classes take List[str] in their hints but accept bytes; talk to them untyped.
_psi: Any = _openmined
Points = NDArray[np.uint8]


def check_points(value: object, rows: int | None) -> str | None:
    """What is wrong with ``value`` as ``rows`` blinded points (any number if None), or None."""
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2):
        return f"must be an (n, {POINT_SIZE}) uint8 array"
    if value.shape[1] != POINT_SIZE:
        return f"must hold {POINT_SIZE}-byte points"
    if rows is not None and value.shape[0] != rows:
        return "has the wrong number of points"
    prefix = value[:, 0]
    if not bool(np.all((prefix == 2) | (prefix == 3))):
        return "holds values that are not compressed curve points"
    return None


def _party_points(payload: Payload, key: str, rows: int | None = None) -> Points:
    value = payload.get(key)
    problem = check_points(value, rows)
    if problem is not None:
        raise MessageError(f"field {key!r} {problem}")
    assert isinstance(value, np.ndarray)
    return value


def _as_list(points: Points) -> list[bytes]:
    data = np.ascontiguousarray(points).tobytes()
    return [data[i : i + POINT_SIZE] for i in range(0, len(data), POINT_SIZE)]


def _as_array(points: Sequence[bytes], rows: int) -> Points:
    data = b"".join(points)
    if len(data) != rows * POINT_SIZE:
        raise ProtocolError("openmined-psi produced points of an unexpected size")
    return np.frombuffer(data, dtype=np.uint8).reshape(rows, POINT_SIZE)


class EcdhRun:
    """One party's side of one cryptographic-mode run.

    Roles follow from the calls, and each step is allowed once, in order: the coordinator blinds,
    intersects with each member, finalises, then answers one request per member over the final
    intersection; a member answers the coordinator's request over all its IDs once, then blinds,
    intersects once and finalises. A party that answered over all its IDs never answers over its
    intersection, so the relay gets no second look at a member's set. ``members`` is the number
    of members the plan has: a coordinator intersects exactly that many times before it
    finalises and answers over the intersection at most that many times (without it a party can
    only be a member), so a replayed or invented member answer cannot buy the relay a look at
    the intersection.
    """

    def __init__(
        self, ids: Sequence[bytes], members: int | None = None, max_request: int | None = None
    ) -> None:
        self._ids = ids
        self._members = members
        self._max_request = max_request
        self._answered_all = False
        self._client: Any = None
        self._order: Rows | None = None
        self._matched: NDArray[np.bool_] | None = None
        self._intersections = 0
        self._final: Rows | None = None
        self._final_server: Any = None
        self._final_setup: Points | None = None
        self._final_answers_left = 0

    def blind(self) -> Payload:
        """``psi.ecdh.blind``: this party's IDs blinded under a fresh key, in a random order."""
        if self._client is not None or self._final is not None:
            raise ProtocolError("this party has already blinded its IDs in this session")
        n = len(self._ids)
        self._client = _psi.client.CreateWithNewKey(True)
        self._order = np.random.default_rng(secrets.randbits(128)).permutation(n).astype(np.int64)
        request = self._client.CreateRequest([self._ids[i] for i in self._order.tolist()])
        return {"blinded": _as_array(request.encrypted_elements, n)}

    def answer(self, payload: Payload) -> Payload:
        """``psi.ecdh.answer``: act as PSI server over all IDs or over the final intersection."""
        over = require(payload, "over", str)
        blinded = _party_points(payload, "blinded")
        if self._max_request is not None and len(blinded) > self._max_request:
            raise ProtocolError(f"a blinded request of more than the plan's {self._max_request} IDs")
        setup: Points | None
        if over == "all":
            if self._answered_all or self._client is not None:
                raise ProtocolError("this party answers over all its IDs once, before it blinds")
            self._answered_all = True
            server = _psi.server.CreateWithNewKey(True)
            setup = self._setup(server, self._ids, len(blinded))
        elif over == "intersection":
            if self._answered_all or self._final is None or self._final_answers_left <= 0:
                raise ProtocolError("only the coordinator answers over the intersection, once per member")
            self._final_answers_left -= 1
            if self._final_server is None:
                self._final_server = _psi.server.CreateWithNewKey(True)
                final_ids = [self._ids[i] for i in self._final.tolist()]
                self._final_setup = self._setup(self._final_server, final_ids, len(blinded))
            server = self._final_server
            setup = self._final_setup
        else:
            raise MessageError("field 'over' must be 'all' or 'intersection'")
        request = _psi.Request()
        request.reveal_intersection = True
        request.encrypted_elements.extend(_as_list(blinded))
        try:
            response = server.ProcessRequest(request)
        except RuntimeError:
            raise ProtocolError("the blinded request holds values that are not curve points") from None
        assert setup is not None
        return {"setup": setup, "reblinded": _as_array(response.encrypted_elements, len(blinded))}

    @staticmethod
    def _setup(server: Any, ids: Sequence[bytes], client_rows: int) -> Points:
        # The false-positive rate is unused by RAW (exact); the library divides it by client_rows.
        message = server.CreateSetupMessage(0.0, max(client_rows, 1), list(ids), _psi.DataStructure.RAW)
        return _as_array(message.raw.encrypted_elements, len(ids))

    def intersect(self, payload: Payload) -> None:
        """``psi.ecdh.intersect``: which of this party's IDs the other side's set holds."""
        if self._client is None or self._order is None or self._final is not None:
            raise ProtocolError("intersect comes after blind and before finalise")
        if self._answered_all and self._intersections:
            raise ProtocolError("a member intersects once, with the coordinator's final set")
        if not self._answered_all and self._members is None:
            raise ProtocolError(
                "this party does not know how many members the plan has: it cannot coordinate"
            )
        if not self._answered_all and self._members is not None and self._intersections >= self._members:
            raise ProtocolError("the coordinator intersects once per member of the plan")
        setup_points = _party_points(payload, "setup")
        reblinded = _party_points(payload, "reblinded", len(self._ids))
        flat = np.ascontiguousarray(setup_points).view(f"S{POINT_SIZE}")[:, 0]
        if not bool(np.all(flat[1:] > flat[:-1])):
            raise MessageError("field 'setup' must be sorted and distinct")
        setup = _psi.ServerSetup()
        setup.raw.encrypted_elements.extend(_as_list(setup_points))
        response = _psi.Response()
        response.encrypted_elements.extend(_as_list(reblinded))
        try:
            found = self._client.GetIntersection(setup, response)
        except RuntimeError:
            raise ProtocolError("the reblinded answer holds values that are not curve points") from None
        matched = np.zeros(len(self._ids), dtype=np.bool_)
        matched[self._order[np.asarray(found, dtype=np.int64)]] = True
        self._matched = matched if self._matched is None else self._matched & matched
        self._intersections += 1

    def finalise(self) -> Rows:
        """``psi.ecdh.finalise``: the rows (unordered) of this party's IDs in the final intersection."""
        if self._matched is None or self._final is not None:
            raise ProtocolError("finalise comes once, after at least one intersect")
        if not self._answered_all and self._intersections != self._members:
            raise ProtocolError("the coordinator finalises after intersecting with every member of the plan")
        self._final = np.flatnonzero(self._matched).astype(np.int64)
        self._final_answers_left = 0 if self._answered_all else self._intersections
        return self._final


def _points(party: str, what: str, payload: Payload, key: str, rows: int | None) -> Points:
    value = payload.get(key)
    problem = check_points(value, rows)
    if problem is not None:
        raise ProtocolError(f"party {party!r}: {what} {key!r} {problem}")
    assert isinstance(value, np.ndarray)
    return value


def _size(party: str, payload: Payload, most: int) -> int:
    size = payload.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= most:
        raise ProtocolError(f"party {party!r} sent no valid intersection size")
    return size


def run_ecdh(
    channels: Sequence[PartyChannel], session: bytes, max_ids: int | None = None
) -> tuple[int, list[int]]:
    """Relay one cryptographic-mode run: the intersection size and each party's set size.

    ``channels[0]`` is the coordinator. The relay checks every array's shape against what it has
    seen so far, and that every party ends with the same intersection size; with ``max_ids`` (the
    plan's ``psi_max_ids``) no set may be larger, here as well as at each honest party.
    """
    coordinator, members = channels[0], list(channels[1:])
    c = coordinator.name
    base = {"session": session}
    request = _points(c, "blind", coordinator.call("psi.ecdh.blind", base), "blinded", None)
    n_coordinator = len(request)
    check_set_size(c, n_coordinator, max_ids)
    answers = call_all(members, "psi.ecdh.answer", {**base, "over": "all", "blinded": request})
    sizes: list[int] = []
    for member, answer in zip(members, answers, strict=True):
        setup = _points(member.name, "answer", answer, "setup", None)
        reblinded = _points(member.name, "answer", answer, "reblinded", n_coordinator)
        check_set_size(member.name, len(setup), max_ids)
        sizes.append(len(setup))
        coordinator.call("psi.ecdh.intersect", {**base, "setup": setup, "reblinded": reblinded})
    del answers
    size = _size(c, coordinator.call("psi.ecdh.finalise", base), min([n_coordinator, *sizes]))

    blinded = call_all(members, "psi.ecdh.blind", base)
    finals: list[Payload] = []
    for member, answer, n_member in zip(members, blinded, sizes, strict=True):
        member_request = _points(member.name, "blind", answer, "blinded", n_member)
        final = coordinator.call(
            "psi.ecdh.answer", {**base, "over": "intersection", "blinded": member_request}
        )
        finals.append(
            {
                **base,
                "setup": _points(c, "answer", final, "setup", size),
                "reblinded": _points(c, "answer", final, "reblinded", n_member),
            }
        )
    del blinded
    call_all(members, "psi.ecdh.intersect", finals)
    for member, answer in zip(members, call_all(members, "psi.ecdh.finalise", base), strict=True):
        if _size(member.name, answer, size) != size:
            raise ProtocolError(f"party {member.name!r} found another intersection size than the coordinator")
    return size, [n_coordinator, *sizes]
