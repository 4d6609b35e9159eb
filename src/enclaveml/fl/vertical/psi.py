"""Private set intersection: align the parties' rows without revealing the rest of their IDs.

One API, two modes, the same result. Each party is a :class:`PsiParty` holding its IDs (str, int or
bytes; see :func:`~enclaveml.fl.vertical._psi_ids.normalise_ids` for the one byte encoding); the server
runs :func:`run_psi` over the parties' channels and gets a :class:`PsiSummary` (sizes only, never an
ID). Afterwards every party's :attr:`PsiParty.aligned_rows` are the positions, in its own ID list, of
the intersection, sorted by the IDs' bytes: the same entities in the same order at every party and in
both modes, so ``features[party.aligned_rows]`` lines up across parties. No order crosses the wire;
each party sorts locally.

TEE mode (``mode="tee"``): the server in the TEE intersects keyed hashes
--------------------------------------------------------------------------

The parties share a PSI key released by the key broker (``KeyBrokerClient(...).release("vfl-psi")``,
a :class:`~enclaveml.crypto.KeyHandle`). **The key's broker policy must admit the parties' client
measurement and not the server's**: a server with the key could hash guesses of low-entropy IDs
(account numbers, phone numbers) and recognise them. Key schedule and tag size:
:mod:`enclaveml.fl.vertical._psi_tee` (HMAC-SHA256 under an HKDF-derived per-run key, 16-byte tags).

::

    method      server → party                           party → server
    psi.hashes  session: 32 random bytes                 tags: (n, 16) uint8, the party's tags sorted
    psi.result  session; positions: ascending int64      confirm: 32 bytes, an HMAC of the
                positions in the party's upload; size    intersection's tags in canonical order

The server intersects the sorted uploads and returns to each party the positions of the common
tags in its own upload; the party maps them to its rows and sorts them canonically.

Who learns what. *The server*: each party's set size; its tags, which are pseudorandom without the
key and unlinkable to other runs (the session enters the key derivation); which uploaded tags
match, so the size of the intersection of every subset of parties, not just of all of them; and
whether the confirmation values agree (it checks them when the intersection is not empty). Not an
ID, not a row order (uploads are sorted by tag). *Each party*: which of its own IDs are in the
intersection, hence its size. Nothing about the other parties' IDs or set sizes.

Cryptographic mode (``mode="ecdh"``): ECDH-PSI between the parties, the server only relays
-------------------------------------------------------------------------------------------

For parties that do not trust a TEE. ECDH-PSI through openmined-psi (P-256; details in
:mod:`enclaveml.fl.vertical._psi_ecdh`); each party blinds with fresh keys each run. The first
channel is the *coordinator* (the label party), the others are *members*. ``H(x)^a`` is ID ``x``
hashed to the curve and blinded by key ``a``; every list of points is an (n, 33) uint8 array.
Every call also carries the run's ``session`` (32 random bytes)::

    #  method              to             server → party                    party → server
    1  psi.ecdh.blind      coordinator    session                           blinded: H(x)^a, random order
    2  psi.ecdh.answer     each member j  session, over="all",              setup: H(y)^b, sorted;
                                          blinded of 1                      reblinded: H(x)^ab, as sent
    3  psi.ecdh.intersect  coordinator    session, setup, reblinded of 2    (empty)
    4  psi.ecdh.finalise   coordinator    session                           size: k
    5  psi.ecdh.blind      each member j  session                           blinded: H(y)^c, random order
    6  psi.ecdh.answer     coordinator    session, over="intersection",     setup: H(z)^d over the final
                                          blinded of 5                      intersection, sorted; reblinded
    7  psi.ecdh.intersect  each member j  session, setup, reblinded of 6    (empty)
    8  psi.ecdh.finalise   each member j  session                           size: k (the relay checks it)

That is 2(m - 1) PSI runs for m parties: the coordinator runs as PSI client against each member
(one blinded request, reused) and intersects the results; then each member runs as PSI client
against the coordinator holding the final intersection. Cost: about (2m - 1) n_A + 4 sum_j n_j + k
elliptic-curve operations for set sizes n_A (coordinator), n_j (members) and k (intersection),
against 4n for one bare openmined-psi run between two sets of n. Who learns what, assuming the DDH problem
is hard on P-256 and everyone follows the protocol. *The relay*: every set size and the final
intersection size; the points are blinded under keys it never holds. *The coordinator*: which of
its IDs each member holds (the pairwise intersections, more than the final one) and each member's
set size. *A member*: the coordinator's set size and which of its own IDs are in the final
intersection. Limits: a malicious relay can replace a request with blinded guesses of its own
(step 2 or 6) and learn which guesses a member holds, or which lie in the intersection; the run then
no longer aligns, and the parties cannot tell without authenticating each other end to end, which
this mode does not do. A :class:`PsiParty` takes part in one session only, a member answers over
its set once, and the coordinator intersects with and answers over the intersection exactly once
per member of the plan (``parties``), so that is one set of guesses per member and run, and a
relay that uses it breaks the run. Its size is bounded only by the plan's ``psi_max_ids``
(``max_ids``); without it one set of guesses may cover a whole low-entropy ID space. A party
may also lie about its own set (inherent to PSI without certified inputs).

Both modes validate every message both ways and raise :class:`ProtocolError` (server side, naming
the party) or :class:`MessageError` (party side); no error text holds an ID or a key.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from enclaveml.crypto import KeyHandle
from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import PartyChannel, PartyEndpoint, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import MessageError, ProtocolError
from enclaveml.fl.vertical._psi_ecdh import EcdhRun, run_ecdh
from enclaveml.fl.vertical._psi_ids import Rows, canonical_rows, normalise_ids
from enclaveml.fl.vertical._psi_tee import SESSION_SIZE, TeeRun, run_tee

__all__ = ["DEFAULT_KEY_ID", "PSI_MODES", "PsiParty", "PsiSummary", "run_psi"]

PsiMode = Literal["tee", "ecdh"]
PSI_MODES: tuple[PsiMode, ...] = ("tee", "ecdh")
DEFAULT_KEY_ID = "vfl-psi"
"""The broker key name the CLI uses for TEE-mode PSI (its policy: the parties' client measurement)."""


@dataclass(frozen=True)
class PsiSummary:
    """What the server knows after a run: sizes, no IDs."""

    mode: PsiMode
    parties: tuple[str, ...]
    set_sizes: tuple[int, ...]
    intersection_size: int


class PsiParty(PartyEndpoint):
    """A party's side of PSI: its IDs, and afterwards its aligned rows.

    ``key`` is the PSI key from the broker, needed for TEE mode only. ``parties`` is how many
    parties the job has (``len(plan.parties)``), needed by the coordinator of cryptographic mode:
    it intersects with, and answers, exactly that many members less one, whatever the relay asks.
    ``max_ids`` (``plan.psi_max_ids``) bounds this party's own set and, in cryptographic mode, the
    blinded requests it answers: the guesses a relay can test in its one look.
    The IDs are normalised and checked here (:class:`~enclaveml.errors.ConfigurationError` on a
    mix of kinds or duplicates).

    A party takes part in one run: the first session it sees is its only one, and a call of any
    other session is refused (:class:`ProtocolError`), so an untrusted relay cannot open extra
    runs to look at the party's set again, nor reset a finished one. Make a new ``PsiParty`` for
    another run.
    """

    def __init__(
        self,
        name: str,
        ids: Iterable[object],
        *,
        key: KeyHandle | None = None,
        parties: int | None = None,
        max_ids: int | None = None,
    ) -> None:
        super().__init__(name)
        if key is not None and not isinstance(key, KeyHandle):
            raise ConfigurationError("the PSI key must be a KeyHandle (e.g. from KeyBrokerClient.release)")
        if parties is not None and (not isinstance(parties, int) or isinstance(parties, bool) or parties < 2):
            raise ConfigurationError("parties is the number of parties in the job, two or more")
        self._parties = parties
        self._ids = normalise_ids(ids)
        if max_ids is not None and len(self._ids) > max_ids:
            raise ConfigurationError(f"this party holds {len(self._ids)} IDs, more than the plan's {max_ids}")
        self._max_ids = max_ids
        self._key = key
        self._lock = threading.Lock()
        self._session: bytes | None = None
        self._mode: PsiMode | None = None
        self._tee: TeeRun | None = None
        self._ecdh: EcdhRun | None = None
        self._rows: Rows | None = None
        handlers: dict[str, Callable[[Payload], Payload]] = {
            "psi.hashes": self._hashes,
            "psi.result": self._result,
            "psi.ecdh.blind": self._blind,
            "psi.ecdh.answer": self._answer,
            "psi.ecdh.intersect": self._intersect,
            "psi.ecdh.finalise": self._finalise,
        }
        for method, handler in handlers.items():
            self.register(method, self._serialised(handler))

    @property
    def set_size(self) -> int:
        """How many IDs this party holds."""
        return len(self._ids)

    @property
    def aligned_rows(self) -> Rows:
        """Positions into this party's IDs of the intersection, in the canonical order (read-only).

        :raises ProtocolError: no run has finished since the last one started.
        """
        if self._rows is None:
            raise ProtocolError(f"party {self.name!r} has no PSI result: no run has finished")
        return self._rows

    @property
    def intersection_size(self) -> int:
        return len(self.aligned_rows)

    def _serialised(self, handler: Callable[[Payload], Payload]) -> Callable[[Payload], Payload]:
        def locked(payload: Payload) -> Payload:
            with self._lock:
                return handler(payload)

        return locked

    def _enter(self, payload: Payload, mode: PsiMode, *, start: bool) -> None:
        """Check the call belongs to the current session, or start a new one if ``start``."""
        session = require(payload, "session", bytes)
        assert isinstance(session, bytes)
        if len(session) != SESSION_SIZE:
            raise MessageError(f"field 'session' must be {SESSION_SIZE} bytes")
        if session == self._session:
            if self._mode != mode:
                raise ProtocolError("this PSI session runs in the other mode")
            return
        if self._session is not None:
            raise ProtocolError("this party has taken part in a PSI session already: one run per PsiParty")
        if not start:
            raise ProtocolError("this call belongs to another PSI session, or comes out of turn")
        self._session, self._mode = session, mode
        if mode == "ecdh":
            members = None if self._parties is None else self._parties - 1
            self._ecdh = EcdhRun(self._ids, members=members, max_request=self._max_ids)

    # TEE mode

    def _hashes(self, payload: Payload) -> Payload:
        if self._key is None:
            raise ConfigurationError(f"party {self.name!r} has no PSI key; TEE-mode PSI needs one")
        self._enter(payload, "tee", start=True)
        if self._tee is not None:
            raise ProtocolError("the tags of this session were sent already")
        assert self._session is not None
        self._tee = TeeRun(self._ids, self._key, self._session)
        return self._tee.upload()

    def _result(self, payload: Payload) -> Payload:
        self._enter(payload, "tee", start=False)
        if self._tee is None or self._rows is not None:
            raise ProtocolError("psi.result comes once, after psi.hashes")
        self._rows, answer = self._tee.finish(payload)
        return answer

    # Cryptographic mode

    def _run(self, payload: Payload, *, start: bool) -> EcdhRun:
        self._enter(payload, "ecdh", start=start)
        assert self._ecdh is not None
        return self._ecdh

    def _blind(self, payload: Payload) -> Payload:
        return self._run(payload, start=True).blind()

    def _answer(self, payload: Payload) -> Payload:
        return self._run(payload, start=payload.get("over") == "all").answer(payload)

    def _intersect(self, payload: Payload) -> Payload:
        self._run(payload, start=False).intersect(payload)
        return {}

    def _finalise(self, payload: Payload) -> Payload:
        rows = self._run(payload, start=False).finalise()
        self._rows = canonical_rows(self._ids, rows)
        return {"size": len(rows)}


def run_psi(
    channels: Sequence[PartyChannel], mode: PsiMode = "tee", *, max_ids: int | None = None
) -> PsiSummary:
    """Run PSI over ``channels`` (two or more; in ``"ecdh"`` mode the first is the coordinator).

    ``max_ids`` is the plan's ``psi_max_ids``: a party sending a larger set fails the run.

    :raises ConfigurationError: an unknown mode, fewer than two parties, or repeated party names.
    :raises ProtocolError: a party answered with malformed data, or the parties disagree.
    :raises PartyFailedError: a party's handler failed (e.g. it holds no PSI key in TEE mode).
    """
    if mode not in PSI_MODES:
        raise ConfigurationError(f"PSI mode must be one of {', '.join(PSI_MODES)}")
    names = tuple(ch.name for ch in channels)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigurationError("PSI needs two or more parties with distinct names")
    if mode == "tee":
        size, sizes = run_tee(channels, max_ids)
    else:
        size, sizes = run_ecdh(channels, secrets.token_bytes(SESSION_SIZE), max_ids)
    return PsiSummary(mode=mode, parties=names, set_sizes=tuple(sizes), intersection_size=size)
