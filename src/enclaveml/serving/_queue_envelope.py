"""The encrypted envelope and the plaintext records that the Redis Streams queue stores.

Redis lives outside the TEE, so everything the queue writes there that carries model names,
inputs, outputs or error text is sealed here first; :mod:`._redis_queue` documents where the
sealed bytes go. This module owns the byte formats, once, next to the code that reads and
writes them.

Key
    ``HKDF-SHA256(ikm = cluster key, salt = none, info = b"enclaveml/serving/queue/redis-streams/v1")``,
    32 bytes, used as an AES-256-GCM key. The fixed label separates this key from every other
    use of the cluster key.

Envelope (``c`` field of every stream entry)::

    offset  size  field
    0       1     format, 0x01
    1       4     cluster key version, unsigned big-endian
    5       12    nonce, random per envelope (os.urandom)
    17      n+16  AES-256-GCM ciphertext of the record (n bytes) followed by its 16-byte tag

Associated data (never stored; both sides rebuild it)::

    b"enclaveml-queue/v1" || direction (1 byte: 0x51 'Q' request, 0x52 'R' reply)
    || u16 len(stream key) || stream key (UTF-8) || request id (16 raw bytes)
    || envelope bytes 0..4 (format and key version)

so an envelope only opens for the request id, the stream and the direction it was sealed
for: it cannot be moved to another entry, replayed from the request stream into a reply
stream, or steered to another front end's reply stream.

Request record (plaintext inside a request envelope)::

    0       1     record type, 0x01
    1       8     deadline, Unix time in milliseconds, unsigned big-endian
    9       16    front-end id (raw bytes; names the reply stream)
    25      2     model name length m, unsigned big-endian
    27      m     model name, UTF-8
    27+m    ...   payload (opaque serialized inference request)

Reply record (plaintext inside a reply envelope)::

    0       1     status: 0x00 ok, 0x01 the handler raised
    1       ...   ok: the handler's bytes; error: UTF-8 "ExceptionType\\nmessage" (message <= 1 KiB)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclaveml.crypto._buffers import FreshBytes
from enclaveml.crypto.keys import KeyHandle
from enclaveml.errors import ConfigurationError
from enclaveml.serving._queue import QueueDecryptionError

__all__ = [
    "REPLY",
    "REQUEST",
    "RID_SIZE",
    "QueueCipher",
    "ReplyRecord",
    "RequestRecord",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "request_head",
]

Buffer = bytes | bytearray | memoryview
"""A bytes-like object (``collections.abc.Buffer`` from Python 3.12)."""

_HKDF_INFO = b"enclaveml/serving/queue/redis-streams/v1"
_AAD_LABEL = b"enclaveml-queue/v1"
_FORMAT = 0x01
_HEADER = struct.Struct(">BI")
_NONCE_SIZE = 12
_TAG_SIZE = 16
_BLOCK_SIZE = 16  # AES
_MIN_ENVELOPE = _HEADER.size + _NONCE_SIZE + _TAG_SIZE
REQUEST = b"Q"
REPLY = b"R"
RID_SIZE = 16

_REQUEST_HEAD = struct.Struct(">BQ16sH")
_REQUEST_TYPE = 0x01
_STATUS_OK = 0x00
_STATUS_ERROR = 0x01
_MAX_ERROR_TEXT = 1024


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What a front end tells a worker, all of it sealed."""

    deadline_ms: int
    frontend_id: bytes
    model: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """What a worker answers: the handler's bytes, or the type and text of what it raised."""

    ok: bool
    body: bytes = b""
    error_type: str = ""
    error_message: str = ""


class QueueCipher:
    """Seals and opens queue envelopes under the key derived from the cluster key.

    Holds only the derived key (as cipher objects), never the cluster key itself, and prints as
    its key version.
    """

    __slots__ = ("_aead", "_aes", "_header", "key_version")

    def __init__(self, cluster_key: KeyHandle) -> None:
        if not isinstance(cluster_key, KeyHandle):
            raise ConfigurationError("cluster_key must be the KeyHandle released by the key broker")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            cluster_key.secret_bytes()
        )
        self._aead = AESGCM(derived)
        self._aes = algorithms.AES(derived)
        self.key_version = cluster_key.version
        self._header = _HEADER.pack(_FORMAT, cluster_key.version)

    def __repr__(self) -> str:
        return f"QueueCipher(key_version={self.key_version})"

    def __reduce__(self) -> Any:
        raise TypeError("queue ciphers cannot be pickled")

    @staticmethod
    def _aad(direction: bytes, stream: str, rid: bytes, header: bytes) -> bytes:
        name = stream.encode()
        return b"".join((_AAD_LABEL, direction, struct.pack(">H", len(name)), name, rid, header))

    def seal(self, direction: bytes, stream: str, rid: bytes, record: Buffer | Sequence[Buffer]) -> bytes:
        """Encrypt ``record`` for one (direction, stream, request id); random 96-bit nonce.

        ``record`` may be given as parts (its concatenation): each is encrypted straight into
        the envelope, so a large record is never joined or copied before encryption. The
        envelope is filled in place without being zeroed first (:class:`FreshBytes`): under
        load, zeroing a 600 KB image request cost the front end as much as a copy.
        """
        parts = [record] if isinstance(record, bytes | bytearray | memoryview) else record
        views = [memoryview(part).cast("B") for part in parts]
        nonce = _random_nonce()
        body = _HEADER.size + _NONCE_SIZE
        envelope = FreshBytes(body + sum(len(view) for view in views) + _TAG_SIZE)
        try:
            out = envelope.view
            out[: _HEADER.size] = self._header
            out[_HEADER.size : body] = nonce
            encryptor = Cipher(self._aes, modes.GCM(nonce)).encryptor()
            encryptor.authenticate_additional_data(self._aad(direction, stream, rid, self._header))
            offset = body
            for view in views:
                # The tag's 16 bytes still follow, which update_into needs as room (block size - 1).
                offset += encryptor.update_into(view, out[offset:])
            encryptor.finalize()
            out[offset:] = encryptor.tag  # exactly the last 16 bytes, or the assignment raises
        except BaseException:
            envelope.discard()
            raise
        return envelope.finish()

    def is_foreign_version(self, envelope: Buffer) -> bool:
        """True if the envelope names another cluster key version (public header data, not an oracle)."""
        return (
            len(envelope) >= _HEADER.size
            and envelope[0] == _FORMAT
            and envelope[: _HEADER.size] != self._header
        )

    def _checked(self, rid: bytes, envelope: Buffer) -> tuple[memoryview, bytes]:
        """The envelope as a view (slices of it do not copy the ciphertext) and its nonce."""
        view = memoryview(envelope).cast("B")
        if len(view) < _MIN_ENVELOPE or len(rid) != RID_SIZE:
            raise QueueDecryptionError("invalid queue envelope")
        if view[: _HEADER.size] != self._header:
            # Another format or cluster key version: this process cannot open it.
            raise QueueDecryptionError("invalid queue envelope")
        return view, bytes(view[_HEADER.size : _HEADER.size + _NONCE_SIZE])

    def open(self, direction: bytes, stream: str, rid: bytes, envelope: Buffer) -> bytes:
        """Decrypt an envelope; every failure is the same QueueDecryptionError (no oracle)."""
        view, nonce = self._checked(rid, envelope)
        aad = self._aad(direction, stream, rid, self._header)
        try:
            return self._aead.decrypt(nonce, view[_HEADER.size + _NONCE_SIZE :], aad)
        except InvalidTag:
            raise QueueDecryptionError("invalid queue envelope") from None

    def open_request(self, stream: str, rid: bytes, envelope: Buffer) -> RequestRecord:
        """``decode_request(open(REQUEST, stream, rid, envelope))``, with the payload never copied.

        The record's head and model name are decrypted first, then the payload into a ``bytes``
        of its own, filled in place (:class:`FreshBytes`: slicing it out of the record would
        copy it, and the ``bytes`` that ``update`` returns is zeroed before it is written).
        Nothing is returned before the tag is verified (a failure wipes what was decrypted), and
        every failure is the same QueueDecryptionError.
        """
        view, nonce = self._checked(rid, envelope)
        decryptor = Cipher(self._aes, modes.GCM(nonce)).decryptor()
        decryptor.authenticate_additional_data(self._aad(REQUEST, stream, rid, self._header))
        body = view[_HEADER.size + _NONCE_SIZE : len(view) - _TAG_SIZE]
        fixed = min(_REQUEST_HEAD.size, len(body))
        head = decryptor.update(body[:fixed])
        # A length that does not fit (a forged or corrupt envelope) still goes through the tag check.
        name_end = fixed + (int.from_bytes(head[-2:], "big") if fixed == _REQUEST_HEAD.size else 0)
        if name_end > len(body):
            name_end = fixed
        name = decryptor.update(body[fixed:name_end])
        ciphertext = body[name_end:]
        payload = FreshBytes(len(ciphertext))
        try:
            # GCM writes exactly len(data), but update_into wants room for a block beyond it:
            # the last bytes go through a small buffer of their own.
            split = max(0, len(ciphertext) - _BLOCK_SIZE)
            written = decryptor.update_into(ciphertext[:split], payload.view) if split else 0
            payload.view[written:] = decryptor.update(ciphertext[split:])
            decryptor.finalize_with_tag(bytes(view[len(view) - _TAG_SIZE :]))
        except InvalidTag:
            payload.discard()
            raise QueueDecryptionError("invalid queue envelope") from None
        except BaseException:
            payload.discard()
            raise
        return _request_record(head, name, payload.finish())


def _random_nonce() -> bytes:
    return os.urandom(_NONCE_SIZE)


def request_head(deadline_ms: int, frontend_id: bytes, model: str) -> bytes:
    """The request record up to its payload (the payload follows it, as its own part or parts)."""
    name = model.encode()
    if len(name) > 0xFFFF:
        raise ConfigurationError("model names are at most 65535 bytes")
    if len(frontend_id) != 16:
        raise ConfigurationError("front-end ids are 16 bytes")
    return _REQUEST_HEAD.pack(_REQUEST_TYPE, deadline_ms, frontend_id, len(name)) + name


def encode_request(record: RequestRecord) -> bytes:
    return request_head(record.deadline_ms, record.frontend_id, record.model) + record.payload


def decode_request(data: bytes) -> RequestRecord:
    """Parse an opened request record; authenticated but still checked, as a bug guard."""
    end = _REQUEST_HEAD.size + (
        int.from_bytes(data[_REQUEST_HEAD.size - 2 : _REQUEST_HEAD.size], "big")
        if len(data) >= _REQUEST_HEAD.size
        else 0
    )
    return _request_record(data[: _REQUEST_HEAD.size], data[_REQUEST_HEAD.size : end], data[end:])


def _request_record(head: bytes, name: bytes, payload: bytes) -> RequestRecord:
    """The record from its three pieces: fixed head, model name, payload."""
    if len(head) != _REQUEST_HEAD.size:
        raise QueueDecryptionError("invalid queue envelope")
    kind, deadline_ms, frontend_id, model_len = _REQUEST_HEAD.unpack(head)
    if kind != _REQUEST_TYPE or len(name) != model_len:
        raise QueueDecryptionError("invalid queue envelope")
    try:
        model = name.decode()
    except UnicodeDecodeError:
        raise QueueDecryptionError("invalid queue envelope") from None
    return RequestRecord(deadline_ms, frontend_id, model, payload)


def encode_reply(record: ReplyRecord) -> bytes:
    if record.ok:
        return bytes((_STATUS_OK,)) + record.body
    text = f"{record.error_type}\n{record.error_message}".encode(errors="replace")[:_MAX_ERROR_TEXT]
    return bytes((_STATUS_ERROR,)) + text


def decode_reply(data: bytes) -> ReplyRecord:
    if not data or data[0] not in (_STATUS_OK, _STATUS_ERROR):
        raise QueueDecryptionError("invalid queue envelope")
    if data[0] == _STATUS_OK:
        return ReplyRecord(ok=True, body=data[1:])
    error_type, _, message = data[1:].decode(errors="replace").partition("\n")
    return ReplyRecord(ok=False, error_type=error_type, error_message=message)
