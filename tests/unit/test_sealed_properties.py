"""Properties of sealed artifacts: round trips, and every kind of damage is one DecryptionError.

Plaintexts are drawn as (size, seed) rather than as Hypothesis binaries so that several
16 KiB chunks stay cheap to generate; sizes favour chunk boundaries and their neighbours.
"""

from __future__ import annotations

import itertools
import random
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaveml.crypto._sealed_header import AUTH_FAILED, CHUNK_SIZE, STREAM_HEADER_SIZE, TAG_SIZE
from enclaveml.crypto.keys import DataKeyUnwrapper, KeyHandle, KeyRing
from enclaveml.crypto.sealed import (
    read_header,
    seal_bytes,
    seal_file,
    unseal_bytes,
    unseal_file,
    unseal_file_to_bytes,
    unseal_stream,
)
from enclaveml.errors import ConfigurationError, DecryptionError, KeyNotFoundError

KEY = KeyHandle.generate("model-key")
FORMAT_ERRORS = (
    "malformed sealed-artifact header",
    "not an enclaveml sealed artifact",
    "unsupported sealed-artifact",
)
CIPHER_CHUNK = CHUNK_SIZE + TAG_SIZE
BOUNDARY_SIZES = sorted({k * CHUNK_SIZE + d for k in range(5) for d in (-1, 0, 1)} - {-1})

sizes = st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 4 * CHUNK_SIZE + 100))
plaintexts = st.builds(lambda size, seed: random.Random(seed).randbytes(size), sizes, st.integers(0, 2**32))
multi_chunk = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size),
    st.integers(3 * CHUNK_SIZE, 5 * CHUNK_SIZE + 10),
    st.integers(0, 2**32),
)
header_text_alphabet = st.characters(
    min_codepoint=0x20, max_codepoint=0x2FFF, exclude_categories=["Cc", "Cs"]
)
header_text = st.text(header_text_alphabet)
metadata_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
metadata_maps = st.dictionaries(
    metadata_names, header_text.filter(lambda v: len(v.encode()) <= 1024), max_size=6
)


def seal(plaintext: bytes) -> bytes:
    return seal_bytes(plaintext, wrapper=KEY, key_id="model-key")


@contextmanager
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def chunk_offsets(blob: bytes) -> list[int]:
    """Start of every ciphertext chunk, then the end of the blob."""
    start = read_header(blob).size + STREAM_HEADER_SIZE
    return [*range(start, len(blob), CIPHER_CHUNK), len(blob)]


def rejection(blob: bytes, call: Callable[[], object]) -> str:
    """Run ``call``, which must fail, and return its message.

    A damaged key id or key version may name a key the unwrapper does not hold: that
    KeyNotFoundError is allowed to propagate (it says which key is needed, nothing secret),
    but only when the parsed header really names another key.
    """
    with pytest.raises((DecryptionError, KeyNotFoundError)) as caught:
        call()
    if isinstance(caught.value, KeyNotFoundError):
        header = read_header(blob)
        assert (header.key_id, header.key_version) != ("model-key", 1)
        return "key not found"
    message = str(caught.value)
    assert message == AUTH_FAILED or message.startswith(FORMAT_ERRORS), message
    return message


def assert_rejected_everywhere(blob: bytes, *, files: bool = True) -> set[str]:
    """Every whole-artifact API fails, returns nothing and leaves no file behind; return the messages."""
    messages = {rejection(blob, lambda: unseal_bytes(blob, unwrapper=KEY))}
    if files:
        with folder() as tmp:
            (tmp / "s").write_bytes(blob)
            messages.add(rejection(blob, lambda: unseal_file(tmp / "s", tmp / "out", unwrapper=KEY)))
            messages.add(rejection(blob, lambda: unseal_file_to_bytes(tmp / "s", unwrapper=KEY)))
            messages.add(rejection(blob, lambda: b"".join(unseal_stream(tmp / "s", unwrapper=KEY))))
            assert [p.name for p in tmp.iterdir()] == ["s"]
    return messages


# --- round trips -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(plaintexts)
def test_bytes_round_trip(plaintext: bytes) -> None:
    assert unseal_bytes(seal(plaintext), unwrapper=KEY) == plaintext


@settings(max_examples=25, deadline=None)
@given(plaintexts)
def test_file_round_trip(plaintext: bytes) -> None:
    with folder() as tmp:
        (tmp / "p").write_bytes(plaintext)
        seal_file(tmp / "p", tmp / "s", wrapper=KEY, key_id="model-key")
        assert unseal_bytes((tmp / "s").read_bytes(), unwrapper=KEY) == plaintext
        unseal_file(tmp / "s", tmp / "o", unwrapper=KEY)
        assert (tmp / "o").read_bytes() == plaintext
        assert unseal_file_to_bytes(tmp / "s", unwrapper=KEY) == plaintext
        assert b"".join(unseal_stream(tmp / "s", unwrapper=KEY)) == plaintext


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_exact_chunk_boundaries_round_trip(size: int) -> None:
    plaintext = random.Random(size).randbytes(size)
    blob = seal(plaintext)
    assert len(blob) == read_header(blob).size + STREAM_HEADER_SIZE + size + TAG_SIZE * (
        size // CHUNK_SIZE + 1
    )
    assert unseal_bytes(blob, unwrapper=KEY) == plaintext


@settings(max_examples=40, deadline=None)
@given(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255), metadata_maps
)
def test_content_type_and_metadata_round_trip(content_type: str, metadata: dict[str, str]) -> None:
    blob = seal_bytes(b"m", wrapper=KEY, key_id="model-key", content_type=content_type, metadata=metadata)
    header = read_header(blob)
    assert header.content_type == content_type
    assert dict(header.metadata) == metadata
    assert list(header.metadata) == sorted(metadata, key=str.encode)
    assert unseal_bytes(blob, unwrapper=KEY) == b"m"


@settings(max_examples=30, deadline=None)
@given(st.text(header_text_alphabet, min_size=1, max_size=80), st.integers(1, 2**32 - 1))
def test_key_id_and_version_round_trip(key_id: str, version: int) -> None:
    handle = KeyHandle(key_id, version, bytes(32))
    header = read_header(seal_bytes(b"", wrapper=handle, key_id=key_id))
    assert (header.key_id, header.key_version) == (key_id, version)


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.fixed_dictionaries({"key_id": st.text(min_size=256, max_size=300)}),
        st.fixed_dictionaries({"content_type": st.text(st.characters(min_codepoint=0x80), min_size=1)}),
        st.fixed_dictionaries(
            {"metadata": st.dictionaries(metadata_names, st.just(""), min_size=65, max_size=70)}
        ),
        st.fixed_dictionaries(
            {
                "metadata": st.dictionaries(
                    metadata_names, st.text(min_size=1025, max_size=1100), min_size=1, max_size=1
                )
            }
        ),
    )
)
def test_limits_are_enforced(kwargs: dict[str, object]) -> None:
    options: dict[str, object] = {"wrapper": KEY, "key_id": "model-key", **kwargs}
    with pytest.raises(ConfigurationError):
        seal_bytes(b"x", **options)  # type: ignore[arg-type]


# --- damage ----------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 40), st.integers(1, 255))
def test_every_single_byte_flip_of_a_small_artifact_is_rejected(size: int, mask: int) -> None:
    blob = seal(bytes(range(size)))
    messages = set()
    for position in range(len(blob)):
        broken = bytearray(blob)
        broken[position] ^= mask
        messages |= assert_rejected_everywhere(bytes(broken), files=position % 16 == 0)
    assert AUTH_FAILED in messages
    assert any(m.startswith(FORMAT_ERRORS) for m in messages)


@settings(max_examples=60, deadline=None)
@given(multi_chunk, st.data())
def test_byte_flips_anywhere_in_a_large_artifact_are_rejected(plaintext: bytes, data: st.DataObject) -> None:
    blob = seal(plaintext)
    header_size = read_header(blob).size
    position = data.draw(
        st.one_of(st.integers(0, header_size - 1), st.integers(header_size, len(blob) - 1)), label="position"
    )
    broken = bytearray(blob)
    broken[position] ^= data.draw(st.integers(1, 255), label="mask")
    messages = assert_rejected_everywhere(bytes(broken), files=data.draw(st.booleans(), label="files"))
    if position >= header_size:
        assert messages == {AUTH_FAILED}


@settings(max_examples=40, deadline=None)
@given(plaintexts, st.data())
def test_truncation_at_and_between_chunk_boundaries_is_rejected(
    plaintext: bytes, data: st.DataObject
) -> None:
    blob = seal(plaintext)
    header_size = read_header(blob).size
    near_boundaries = [
        o + d for o in [header_size, *chunk_offsets(blob)] for d in (-1, 0, 1) if 0 <= o + d < len(blob)
    ]
    cut = data.draw(st.one_of(st.sampled_from(near_boundaries), st.integers(0, len(blob) - 1)), label="cut")
    messages = assert_rejected_everywhere(blob[:cut], files=data.draw(st.booleans(), label="files"))
    if cut >= header_size:
        assert messages == {AUTH_FAILED}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300), st.integers(0, 8), st.binary(max_size=8))
def test_arbitrary_header_edits_raise_only_the_documented_errors(start: int, length: int, new: bytes) -> None:
    blob = seal_bytes(b"payload", wrapper=KEY, key_id="model-key", metadata={"a": "1", "bb": "22"})
    header_size = read_header(blob).size
    start = min(start, header_size)
    edited = blob[:start] + new + blob[min(start + length, header_size) :]
    if edited != blob:
        rejection(edited, lambda: unseal_bytes(edited, unwrapper=KEY))


@pytest.mark.parametrize("size", [0, 1, 100])
def test_every_truncation_of_a_small_artifact_is_rejected(size: int) -> None:
    blob = seal(bytes(size))
    for cut in range(len(blob)):
        assert_rejected_everywhere(blob[:cut], files=cut % 16 == 0)


@settings(max_examples=30, deadline=None)
@given(
    plaintexts,
    st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(1, 40_000), st.integers()),
)
def test_appended_bytes_are_rejected(plaintext: bytes, garbage: bytes) -> None:
    assert assert_rejected_everywhere(seal(plaintext) + garbage, files=len(garbage) % 2 == 0) == {AUTH_FAILED}


@settings(max_examples=30, deadline=None)
@given(multi_chunk, st.data())
def test_swapped_duplicated_or_dropped_chunks_are_rejected(plaintext: bytes, data: st.DataObject) -> None:
    blob = seal(plaintext)
    offsets = chunk_offsets(blob)
    chunks = [blob[a:b] for a, b in itertools.pairwise(offsets)]
    full = [i for i, c in enumerate(chunks) if len(c) == CIPHER_CHUNK]
    i, j = data.draw(st.lists(st.sampled_from(full), min_size=2, max_size=2, unique=True), label="chunks")
    edit = data.draw(st.sampled_from(["swap", "duplicate", "drop"]), label="edit")
    if edit == "swap":
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif edit == "duplicate":
        chunks[j] = chunks[i]
    else:
        del chunks[i]
    broken = blob[: offsets[0]] + b"".join(chunks)
    assert assert_rejected_everywhere(broken, files=data.draw(st.booleans(), label="files")) == {AUTH_FAILED}


@settings(max_examples=25, deadline=None)
@given(plaintexts, plaintexts)
def test_a_header_moved_onto_another_body_is_rejected(first: bytes, second: bytes) -> None:
    a, b = seal(first), seal(second)
    moved = a[: read_header(a).size] + b[read_header(b).size :]
    assert assert_rejected_everywhere(moved, files=False) == {AUTH_FAILED}


@settings(max_examples=25, deadline=None)
@given(plaintexts, st.sampled_from(["other key", "other version", "same key, other version"]))
def test_wrong_key_or_version_is_rejected(plaintext: bytes, case: str) -> None:
    v2 = KeyHandle("model-key", 2, KEY.secret_bytes())
    unwrapper: DataKeyUnwrapper
    if case == "other key":
        blob, unwrapper = seal(plaintext), KeyHandle.generate("model-key")
    elif case == "other version":
        blob, unwrapper = set_version(seal(plaintext), 2), KeyRing(KEY, KeyHandle.generate("model-key", 2))
    else:  # even a version whose KEK is identical fails: the version is bound into the payload
        blob, unwrapper = set_version(seal(plaintext), 2), KeyRing(v2)
    with pytest.raises(DecryptionError, match=AUTH_FAILED):
        unseal_bytes(blob, unwrapper=unwrapper)


def set_version(blob: bytes, version: int) -> bytes:
    at = read_header(blob).size - 65
    return blob[:at] + struct.pack(">I", version) + blob[at + 4 :]


def test_helpers_cover_what_they_claim() -> None:
    blob = seal(bytes(3 * CHUNK_SIZE))
    assert len(chunk_offsets(blob)) == 5  # three full chunks, the (empty) final chunk, the end
    assert set_version(blob, 7) != blob
    assert read_header(set_version(blob, 7)).key_version == 7
