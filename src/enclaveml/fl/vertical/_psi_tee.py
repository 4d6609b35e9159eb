"""TEE-mode PSI: keyed hashes from the parties, a sorted-array intersection in the server.

The protocol and who learns what are in :mod:`enclaveml.fl.vertical.psi`. This module holds the
two halves: :class:`TeeRun` (a party's state during one run) and :func:`run_tee` (the server).

Key schedule, per run (``session`` is the server's 32 random bytes)::

    okm      = HKDF-SHA256(ikm = broker key, salt = none,
                           info = b"enclaveml/fl/vertical/psi/v1" || session, length = 64)
    tag(id)  = HMAC-SHA256(okm[:32], id bytes)[:16]
    confirm  = HMAC-SHA256(okm[32:], the intersection's tags in canonical order, concatenated)

The session in ``info`` makes the tags of two runs unlinkable, even over the same key and IDs.
Tags are 16 bytes: among N tags in one run a false match has probability below N^2 / 2^129,
about 2^-85 for N = 2^22 (four million IDs), and a party without the key cannot aim for one.

A party uploads its tags sorted (bytewise), so the upload order says nothing about its row order;
the server checks the order (which also rules out repeats) and intersects sorted arrays with
``numpy.searchsorted`` on 16-byte strings, with no per-ID Python.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from enclaveml.crypto import KeyHandle
from enclaveml.fl.vertical._channel import PartyChannel, call_all, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import MessageError, ProtocolError
from enclaveml.fl.vertical._psi_ids import Rows, canonical_rows, check_set_size

__all__ = ["SESSION_SIZE", "TAG_SIZE", "TeeRun", "run_tee"]

TAG_SIZE = 16
SESSION_SIZE = 32
CONFIRM_SIZE = 32
_INFO = b"enclaveml/fl/vertical/psi/v1"
_TAG = f"S{TAG_SIZE}"


def _derive(key: KeyHandle, session: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_INFO + session).derive(
        key.secret_bytes()
    )
    return okm[:32], okm[32:]


def positions_of(payload: Payload, key: str, n: int) -> Rows:
    """``payload[key]``: strictly increasing int64 positions in ``[0, n)``, or :class:`MessageError`."""
    value = require(payload, key, np.ndarray)
    assert isinstance(value, np.ndarray)
    if value.ndim != 1 or value.dtype != np.int64:
        raise MessageError(f"field {key!r} must be a 1-D int64 array")
    if value.size and (value[0] < 0 or value[-1] >= n or not bool(np.all(value[1:] > value[:-1]))):
        raise MessageError(f"field {key!r} must hold distinct positions in ascending order within the set")
    return value


def _tags(mac_key: bytes, ids: Sequence[bytes]) -> NDArray[np.bytes_]:
    """The 16-byte tags of ``ids`` as a 1-D ``S16`` array, in the order of ``ids``."""
    keyed = hmac.new(mac_key, digestmod=hashlib.sha256)

    def tag(value: bytes) -> bytes:
        # Copying the keyed state skips re-keying per ID (a third faster than hmac.digest).
        h = keyed.copy()
        h.update(value)
        return h.digest()

    digests = np.frombuffer(b"".join(map(tag, ids)), dtype=np.uint8).reshape(len(ids), 32)
    return np.ascontiguousarray(digests[:, :TAG_SIZE]).view(_TAG)[:, 0]


class TeeRun:
    """One party's side of one TEE-mode run: its tags, their order, and the keys of the run."""

    def __init__(self, ids: Sequence[bytes], key: KeyHandle, session: bytes) -> None:
        self._ids = ids
        self._mac_key, self._confirm_key = _derive(key, session)
        self._row_tags = _tags(self._mac_key, ids)
        # order[p] is the row whose tag is uploaded at position p.
        self._order = np.argsort(self._row_tags, kind="stable").astype(np.int64)
        self._tags = self._row_tags[self._order]

    def upload(self) -> Payload:
        """``psi.hashes``'s answer: the tags, sorted, as an (n, 16) uint8 array."""
        return {"tags": self._tags.view(np.uint8).reshape(len(self._tags), TAG_SIZE)}

    def finish(self, payload: Payload) -> tuple[Rows, Payload]:
        """Take ``psi.result``: the aligned rows, and the answer carrying the confirmation value."""
        positions = positions_of(payload, "positions", len(self._ids))
        size = require(payload, "size", int)
        if size != len(positions):
            raise MessageError("the server's intersection size does not match its positions")
        rows = canonical_rows(self._ids, self._order[positions])
        confirm = hmac.digest(self._confirm_key, self._row_tags[rows].tobytes(), "sha256")
        return rows, {"confirm": confirm}


def _sorted_tags(party: str, payload: Payload) -> NDArray[np.bytes_]:
    tags = payload.get("tags")
    if not (isinstance(tags, np.ndarray) and tags.dtype == np.uint8 and tags.ndim == 2):
        raise ProtocolError(f"party {party!r} sent no (n, {TAG_SIZE}) uint8 array of tags")
    if tags.shape[1] != TAG_SIZE:
        raise ProtocolError(
            f"party {party!r} sent tags of {tags.shape[1]} bytes; the protocol uses {TAG_SIZE}"
        )
    flat = np.ascontiguousarray(tags).view(_TAG)[:, 0]
    if not bool(np.all(flat[1:] > flat[:-1])):
        raise ProtocolError(f"party {party!r} sent tags that are not sorted and distinct")
    return flat


def intersect_sorted(sets: Sequence[NDArray[np.bytes_]]) -> list[Rows]:
    """For sorted, distinct tag arrays: each one's positions of the common tags, ascending."""
    common = min(sets, key=len)
    for tags in sets:
        if not len(common):
            break
        if not len(tags):
            common = common[:0]
            break
        at = np.minimum(np.searchsorted(tags, common), len(tags) - 1)
        common = common[tags[at] == common]
    return [np.searchsorted(tags, common).astype(np.int64) for tags in sets]


def run_tee(channels: Sequence[PartyChannel], max_ids: int | None = None) -> tuple[int, list[int]]:
    """Drive one TEE-mode run: the intersection size and each party's set size.

    ``max_ids`` (the plan's ``psi_max_ids``) is enforced here, in the TEE: every party holds the
    PSI key, so one that tagged a whole low-entropy ID space would learn which of its guesses the
    others hold; the bound every party approved in the plan stops that.

    :raises ProtocolError: a party sent malformed tags or more than ``max_ids``, or the parties'
        confirmation values differ (they did not end with the same aligned order).
    """
    session = secrets.token_bytes(SESSION_SIZE)
    answers = call_all(channels, "psi.hashes", {"session": session})
    sets = [_sorted_tags(ch.name, a) for ch, a in zip(channels, answers, strict=True)]
    for channel, tags in zip(channels, sets, strict=True):
        check_set_size(channel.name, len(tags), max_ids)
    positions = intersect_sorted(sets)
    size = len(positions[0])
    results = call_all(
        channels,
        "psi.result",
        [{"session": session, "positions": p, "size": size} for p in positions],
    )
    confirms = []
    for channel, result in zip(channels, results, strict=True):
        confirm = result.get("confirm")
        if not (isinstance(confirm, bytes) and len(confirm) == CONFIRM_SIZE):
            raise ProtocolError(f"party {channel.name!r} sent no {CONFIRM_SIZE}-byte confirmation")
        confirms.append(confirm)
    # With an empty intersection there is no order to agree on; a party holding another key is
    # then just a party with no IDs in common.
    if size and any(not hmac.compare_digest(c, confirms[0]) for c in confirms[1:]):
        differ = [ch.name for ch, c in zip(channels, confirms, strict=True) if c != confirms[0]]
        raise ProtocolError(
            f"parties {differ} do not confirm the aligned order of party {channels[0].name!r}: "
            "they did not end with the same aligned rows"
        )
    return size, [len(s) for s in sets]
