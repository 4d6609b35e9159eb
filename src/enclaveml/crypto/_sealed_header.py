"""The sealed-artifact header and payload framing: the one place the byte layout is written and read.

Layout (version 1). Integers are unsigned big-endian; every variable field is length-prefixed
and bounded, so a reader never allocates more than :data:`MAX_HEADER_SIZE` bytes for a header::

    offset      size  field
    0           7     magic  "EMLSEAL" (45 4d 4c 53 45 41 4c)
    7           1     format version, 0x01
    8           4     body length B, u32; 8 <= B <= MAX_BODY_SIZE (8,708)
    12          B     body:
                        2      algorithm id, u16; 0x0001 = Cobblestone-256
                        1      key id length K, 1..255
                        K      key id, UTF-8, no control characters
                        1      content type length C, 1..255
                        C      content type, printable ASCII (0x20..0x7e), e.g. "application/onnx"
                        2      metadata entry count M, 0..64
                        M x    entry, sorted by name bytes, names unique:
                                 1  name length, 1..64
                                 .  name, printable ASCII without space (0x21..0x7e)
                                 2  value length, u16, 0..1024
                                 .  value, UTF-8, no control characters
                               (all entries together at most 8,192 bytes)
    12+B        4     key (KEK) version, u32, >= 1
    16+B        1     wrapped data key length W, 1..255
    17+B        W     wrapped data key (DataKeyWrapper output; 60 bytes from KeyHandle)
    17+B+W      ...   payload: the Cobblestone-256 stream of the plaintext under the data key

Bindings:

* the data key is wrapped with associated data = bytes ``[0, 12+B)`` (the header without the
  version and wrapped-key fields). The KEK version cannot be in it: the wrapper chooses the
  version and reports it only after wrapping. Changing the version selects another KEK, which
  cannot unwrap the key, and the version is covered by the payload context below anyway;
* the payload's Cobblestone context = the complete header, bytes ``[0, 17+B+W)``.

Payload framing of Cobblestone-256 (checked against the library by the unit tests): a 56-byte
stream header, then one 16,400-byte chunk (16,384 plaintext bytes + 16-byte tag) per full
16 KiB of plaintext, then a final chunk of 0..16,383 plaintext bytes + 16-byte tag, which is
always present. A plaintext of n bytes therefore gives a payload of
``56 + (n // 16384) * 16400 + n % 16384 + 16`` bytes; each chunk is authenticated and
numbered, and the final chunk is marked as final, so truncation, reordering and appended
bytes all fail authentication.

Parsing is strict: one encoding per header (canonical metadata order, exact lengths,
UTF-8 that round-trips). Every format error raises :class:`~enclaveml.errors.DecryptionError`
naming only the public header field that is wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Protocol

from enclaveml.errors import ConfigurationError, DecryptionError, EnclaveMLError

MAGIC: Final = b"EMLSEAL"
FORMAT_VERSION: Final = 1
ALGORITHM_COBBLESTONE_256: Final = 1
ALGORITHMS: Final = {ALGORITHM_COBBLESTONE_256: "cobblestone-256"}

MAX_KEY_ID_SIZE: Final = 255
MAX_CONTENT_TYPE_SIZE: Final = 255
MAX_METADATA_ENTRIES: Final = 64
MAX_METADATA_NAME_SIZE: Final = 64
MAX_METADATA_VALUE_SIZE: Final = 1024
MAX_METADATA_SIZE: Final = 8192
MAX_WRAPPED_KEY_SIZE: Final = 255
MAX_KEY_VERSION: Final = 2**32 - 1
_MIN_BODY_SIZE: Final = 2 + (1 + 1) + (1 + 1) + 2
MAX_BODY_SIZE: Final = 2 + (1 + MAX_KEY_ID_SIZE) + (1 + MAX_CONTENT_TYPE_SIZE) + 2 + MAX_METADATA_SIZE
_PREFIX_SIZE: Final = len(MAGIC) + 1 + 4
MAX_HEADER_SIZE: Final = _PREFIX_SIZE + MAX_BODY_SIZE + 4 + 1 + MAX_WRAPPED_KEY_SIZE

STREAM_HEADER_SIZE: Final = 56
CHUNK_SIZE: Final = 16384
TAG_SIZE: Final = 16
MIN_PAYLOAD_SIZE: Final = STREAM_HEADER_SIZE + TAG_SIZE
AUTH_FAILED: Final = (
    "sealed artifact failed authentication: it is damaged, truncated or tampered with, "
    "or was sealed under a different key"
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class SealedHeader:
    """The public, unencrypted header of a sealed artifact.

    It says which key (id and version) a client must obtain to unseal, and what the payload is.
    Nothing in it is secret, but nothing in it is trustworthy either until the payload has been
    authenticated: unsealing binds the whole header into the payload's authentication.
    """

    key_id: str
    key_version: int
    content_type: str
    metadata: Mapping[str, str] = field(hash=False)
    algorithm: str = ALGORITHMS[ALGORITHM_COBBLESTONE_256]
    format_version: int = FORMAT_VERSION
    wrapped_data_key: bytes = field(default=b"", repr=False)
    encoded: bytes = field(default=b"", repr=False)
    """The header exactly as stored; the payload starts at ``len(encoded)``."""

    @property
    def size(self) -> int:
        """Length of the encoded header in bytes (the payload's offset in the artifact)."""
        return len(self.encoded)

    @property
    def wrapping_aad(self) -> bytes:
        """Associated data of the wrapped data key: the header without version and wrapped key."""
        return self.encoded[: self.size - 5 - len(self.wrapped_data_key)]


class ByteReader(Protocol):
    """What the streaming readers need from a source: ``read(n)``, as files, pipes and BytesIO have."""

    def read(self, size: int = -1, /) -> bytes | None: ...


# --- writing ---------------------------------------------------------------------------------


def _text(value: object, what: str, limit: int, *, ascii_range: tuple[int, int] | None = None) -> bytes:
    """Validate one header string and return its encoding, raising ConfigurationError."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a string, got {type(value).__name__}")
    try:
        _check_text(value, what, ascii_range)
    except _FieldError as exc:
        raise ConfigurationError(str(exc)) from None
    data = value.encode("utf-8", "strict") if ascii_range is None else value.encode("ascii")
    if len(data) > limit:
        raise ConfigurationError(f"{what} is {len(data)} bytes; at most {limit} are allowed")
    return data


def encode_wrapping_aad(key_id: str, content_type: str, metadata: Mapping[str, str] | None) -> bytes:
    """Encode magic, version, length and body: the data key's associated data and the header's start."""
    key = _text(key_id, "key id", MAX_KEY_ID_SIZE)
    if not key:
        raise ConfigurationError("key id must not be empty")
    ctype = _text(content_type, "content type", MAX_CONTENT_TYPE_SIZE, ascii_range=(0x20, 0x7E))
    if not ctype:
        raise ConfigurationError("content type must not be empty")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ConfigurationError("metadata must be a mapping of strings to strings")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ConfigurationError(f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
    entries: list[tuple[bytes, bytes]] = []
    for name, value in metadata.items():
        name_bytes = _text(name, "metadata name", MAX_METADATA_NAME_SIZE, ascii_range=(0x21, 0x7E))
        if not name_bytes:
            raise ConfigurationError("metadata names must not be empty")
        entries.append((name_bytes, _text(value, f"metadata value of {name!r}", MAX_METADATA_VALUE_SIZE)))
    entries.sort()
    meta = b"".join(bytes([len(n)]) + n + _U16.pack(len(v)) + v for n, v in entries)
    if len(meta) > MAX_METADATA_SIZE:
        raise ConfigurationError(f"metadata encodes to {len(meta)} bytes; at most {MAX_METADATA_SIZE}")
    body = b"".join(
        (
            _U16.pack(ALGORITHM_COBBLESTONE_256),
            bytes([len(key)]) + key,
            bytes([len(ctype)]) + ctype,
            _U16.pack(len(entries)) + meta,
        )
    )
    return MAGIC + bytes([FORMAT_VERSION]) + _U32.pack(len(body)) + body


def complete_header(wrapping_aad: bytes, key_version: object, wrapped: object) -> SealedHeader:
    """Append what the wrapper returned and parse the result back, so writer and reader agree."""
    if not isinstance(key_version, int) or not 1 <= key_version <= MAX_KEY_VERSION:
        raise ConfigurationError(f"the key wrapper returned an invalid key version: {key_version!r}")
    if not isinstance(wrapped, bytes) or not 1 <= len(wrapped) <= MAX_WRAPPED_KEY_SIZE:
        raise ConfigurationError("the key wrapper returned an invalid wrapped key")
    encoded = wrapping_aad + _U32.pack(key_version) + bytes([len(wrapped)]) + wrapped
    try:
        return parse_header(encoded)
    except DecryptionError as exc:  # pragma: no cover - encode and parse disagree: a bug here
        raise ConfigurationError(f"cannot encode this header: {exc}") from None


# --- reading ---------------------------------------------------------------------------------


class _FieldError(EnclaveMLError):
    """Internal: a header field is invalid. Becomes ConfigurationError or DecryptionError."""


def _check_text(value: str, what: str, ascii_range: tuple[int, int] | None) -> None:
    """Header strings end up in logs and terminals: no control characters, no unencodable text."""
    low, high = ascii_range or (0, 0x10FFFF)
    for ch in value:
        code = ord(ch)
        if not low <= code <= high:
            raise _FieldError(f"{what} may contain only ASCII characters {low:#04x}..{high:#04x}")
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise _FieldError(f"{what} must not contain control characters")
        if 0xD800 <= code <= 0xDFFF:
            raise _FieldError(f"{what} must not contain lone surrogates")


def _malformed(what: str) -> DecryptionError:
    return DecryptionError(f"malformed sealed-artifact header: {what}")


class _Reader:
    """Bounds-checked cursor over the encoded header."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, min(end, len(data))

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > self.end:
            raise _malformed(f"{what} runs past the end of the header")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def text(
        self, size: int, what: str, lowest: int, limit: int, ascii_range: tuple[int, int] | None = None
    ) -> str:
        if not lowest <= size <= limit:
            raise _malformed(f"{what} length {size} is outside {lowest}..{limit}")
        raw = self.take(size, what)
        try:
            value = raw.decode("ascii" if ascii_range else "utf-8", "strict")
            _check_text(value, what, ascii_range)
        except (UnicodeDecodeError, _FieldError):
            raise _malformed(f"{what} is not valid text") from None
        return value


def body_size_from_prefix(prefix: bytes) -> int:
    """Check magic and version in the first 12 bytes and return the body length B."""
    if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
        raise DecryptionError("not an enclaveml sealed artifact (bad magic)")
    if len(prefix) < _PREFIX_SIZE:
        raise _malformed("it ends inside the fixed prefix")
    if prefix[len(MAGIC)] != FORMAT_VERSION:
        raise DecryptionError(
            f"unsupported sealed-artifact format version {prefix[len(MAGIC)]}; "
            f"this enclaveml reads version {FORMAT_VERSION}"
        )
    body_size: int = _U32.unpack_from(prefix, len(MAGIC) + 1)[0]
    if not _MIN_BODY_SIZE <= body_size <= MAX_BODY_SIZE:
        raise _malformed(f"body length {body_size} is outside {_MIN_BODY_SIZE}..{MAX_BODY_SIZE}")
    return body_size


def parse_header(data: bytes | bytearray | memoryview) -> SealedHeader:
    """Parse the header at the start of ``data`` (trailing bytes are the payload and are ignored)."""
    view = bytes(data[:MAX_HEADER_SIZE])
    body_end = _PREFIX_SIZE + body_size_from_prefix(view)
    if len(view) < body_end + 5:
        raise _malformed("the artifact ends inside the header")
    body = _Reader(view, _PREFIX_SIZE, body_end)
    algorithm = body.u16("algorithm id")
    if algorithm not in ALGORITHMS:
        raise DecryptionError(f"unsupported sealed-artifact algorithm id {algorithm}")
    key_id = body.text(body.u8("key id length"), "key id", 1, MAX_KEY_ID_SIZE)
    content_type = body.text(
        body.u8("content type length"), "content type", 1, MAX_CONTENT_TYPE_SIZE, (0x20, 0x7E)
    )
    count = body.u16("metadata count")
    if count > MAX_METADATA_ENTRIES:
        raise _malformed(f"{count} metadata entries; at most {MAX_METADATA_ENTRIES}")
    metadata: dict[str, str] = {}
    meta_start, previous = body.pos, b""
    for _ in range(count):
        name = body.text(
            body.u8("metadata name length"), "metadata name", 1, MAX_METADATA_NAME_SIZE, (33, 126)
        )
        if previous and name.encode() <= previous:
            raise _malformed("metadata entries are not sorted by name or repeat a name")
        previous = name.encode()
        metadata[name] = body.text(
            body.u16("metadata value length"), "metadata value", 0, MAX_METADATA_VALUE_SIZE
        )
    if body.pos - meta_start > MAX_METADATA_SIZE:
        raise _malformed(f"metadata exceeds {MAX_METADATA_SIZE} bytes")
    if body.pos != body_end:
        raise _malformed("the body length does not match its fields")
    tail = _Reader(view, body_end, len(view))
    key_version = tail.u32("key version")
    if key_version < 1:
        raise _malformed("key version 0")
    wrapped_size = tail.u8("wrapped key length")
    if wrapped_size < 1:
        raise _malformed("empty wrapped key")
    wrapped = tail.take(wrapped_size, "wrapped key")
    return SealedHeader(
        key_id=key_id,
        key_version=key_version,
        content_type=content_type,
        metadata=MappingProxyType(metadata),
        algorithm=ALGORITHMS[algorithm],
        wrapped_data_key=wrapped,
        encoded=view[: tail.pos],
    )


def read_header_from(stream: ByteReader) -> SealedHeader:
    """Read exactly one header from ``stream``, leaving it positioned at the payload."""
    prefix = _read_up_to(stream, _PREFIX_SIZE)
    rest_size = body_size_from_prefix(prefix) + 5
    rest = _read_up_to(stream, rest_size)
    wrapped = _read_up_to(stream, rest[-1]) if len(rest) == rest_size else b""
    if len(rest) < rest_size or len(wrapped) < rest[-1]:
        raise _malformed("the artifact ends inside the header")
    return parse_header(prefix + rest + wrapped)


def _read_up_to(stream: ByteReader, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file (``read`` may return short counts on pipes)."""
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# --- payload framing -------------------------------------------------------------------------


def payload_size(plaintext_size: int) -> int:
    """Size of the Cobblestone-256 payload for ``plaintext_size`` bytes of plaintext."""
    full, rest = divmod(plaintext_size, CHUNK_SIZE)
    return STREAM_HEADER_SIZE + full * (CHUNK_SIZE + TAG_SIZE) + rest + TAG_SIZE


def plaintext_size(payload_bytes: int) -> int:
    """Inverse of :func:`payload_size`; a length no payload can have fails authentication."""
    if payload_bytes < MIN_PAYLOAD_SIZE:
        raise DecryptionError(AUTH_FAILED)
    full, rest = divmod(payload_bytes - MIN_PAYLOAD_SIZE, CHUNK_SIZE + TAG_SIZE)
    if rest >= CHUNK_SIZE:
        raise DecryptionError(AUTH_FAILED)
    return full * CHUNK_SIZE + rest
