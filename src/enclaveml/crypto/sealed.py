"""Sealed artifacts: files (models, data sets) encrypted for a named key, readable only where it is released.

An artifact is a public header followed by a Cobblestone-256 stream under a fresh random
32-byte *data key*. The data key is wrapped by a named, versioned key-encryption key (KEK)
through a :class:`~enclaveml.crypto.keys.DataKeyWrapper` (a local
:class:`~enclaveml.crypto.keys.KeyHandle`, or the key broker, which never releases the KEK
to the data owner). The byte layout is documented once, in
:mod:`enclaveml.crypto._sealed_header`, and in ``docs/formats.md``.

Sealing::

    seal_bytes(plaintext, wrapper=..., key_id=...)       -> bytes
    seal_file(src, dst, wrapper=..., key_id=...)        -> SealedHeader  (streaming, bounded memory)

Unsealing (all authenticate the header, the wrapped key and every payload byte)::

    read_header(src)                         -> SealedHeader  (no key: which key id/version to ask for)
    unseal_bytes(blob, unwrapper=...)        -> bytes         (in memory; nothing on failure)
    unseal_file_to_bytes(src, unwrapper=...) -> bytes         (sealed file -> memory, e.g. models)
    unseal_file(src, dst, unwrapper=...)     -> SealedHeader  (streaming to an explicitly named file)
    unseal_stream(src, unwrapper=...)        -> Iterator[bytes]  (UNAUTHENTICATED UNTIL THE END)

Failure contract: every authentication failure (wrong key or key version, a flipped bit
anywhere, truncation, reordered chunks, appended bytes, a header moved onto another body)
raises :class:`~enclaveml.errors.DecryptionError` with one fixed message; a malformed or
foreign header raises it with a message naming only the (public) header field. Bad arguments
raise :class:`~enclaveml.errors.ConfigurationError`. ``KeyNotFoundError`` and other key-broker
errors from the (un)wrapper propagate: they say which key is needed, which is not secret.
The whole-artifact functions return or write no plaintext unless the final chunk verified.

Why the streaming paths look the way they do: ``update_into`` with reused buffers runs at
cipher speed, while the bytes-returning ``update`` is 3-5x slower (page faults on fresh output
memory for every call). With the cipher that fast, copying in and out of the page cache costs
as much CPU as the cipher itself, so ``seal_file`` and ``unseal_file`` read and run the cipher
in the calling thread while a writer thread writes the previous block (:mod:`._pipeline`,
about 4 MiB of reused buffers), read regular input files through a memory mapping
(:mod:`._input_blocks`: no read copy; such an input must not be truncated while it is read),
and reserve the output's disk space ahead of the writes.
Progress callbacks still run in the calling thread, and the writer's errors surface there
unchanged.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag

from enclaveml.crypto._buffers import FreshBytes, wipe
from enclaveml.crypto._input_blocks import input_blocks
from enclaveml.crypto._pipeline import BlockPipeline
from enclaveml.crypto._sealed_header import (
    AUTH_FAILED,
    CHUNK_SIZE,
    TAG_SIZE,
    ByteReader,
    SealedHeader,
    complete_header,
    encode_wrapping_aad,
    parse_header,
    payload_size,
    plaintext_size,
    read_header_from,
)
from enclaveml.crypto._sealed_io import (
    Blob,
    OutputFile,
    PathArg,
    as_blob,
    atomic_output,
    check_progress,
    fill,
    open_input,
    output_path,
    regular_file_size,
)
from enclaveml.crypto.keys import KEY_SIZE, DataKeyUnwrapper, DataKeyWrapper, WrappedKeyError
from enclaveml.errors import ConfigurationError, CryptoError, DecryptionError

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Progress",
    "SealedHeader",
    "read_header",
    "seal_bytes",
    "seal_file",
    "unseal_bytes",
    "unseal_file",
    "unseal_file_to_bytes",
    "unseal_file_with_header",
    "unseal_stream",
]

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
Progress = Callable[[int], object]
"""Called after each block with the number of *input* bytes consumed so far (ends at the input size)."""

# 64 Cobblestone chunks (1 MiB) per read: large enough for full cipher speed, small enough for L2.
_BLOCK_CHUNKS: Final = 64
# seal_file and unseal_file: blocks of the (usually memory-mapped) input per cipher call, and the
# number of output buffers the writer thread writes behind from (one being filled by the cipher
# while the other is written). Measured with benchmarks/sealing.py on an idle 2-core machine with
# a mapped input: 4 MiB blocks ran fastest (seal 0.81x, unseal 0.88x openssl), 1-2 MiB paid more
# per-block overhead (0.67-0.74x), 8 MiB was slower again (0.77x); more buffers did not help.
_FILE_BLOCK_CHUNKS: Final = 256
_DEPTH: Final = 2


def _seal_sizes(chunks: int) -> tuple[int, int]:
    """Input and output buffer sizes for sealing ``chunks`` chunks per block.

    update_into needs room for every complete chunk it can emit: a full read's worth, one
    chunk carried over from a short read, and (first call) the 56-byte stream header.
    """
    read = chunks * CHUNK_SIZE
    return read, read + CHUNK_SIZE + (chunks + 2) * TAG_SIZE + 64


def _unseal_sizes(chunks: int) -> tuple[int, int]:
    """Input and output buffer sizes for unsealing ``chunks`` chunks per block."""
    read = chunks * (CHUNK_SIZE + TAG_SIZE)
    return read, read + CHUNK_SIZE


_UNSEAL_READ, _UNSEAL_OUT = _unseal_sizes(_BLOCK_CHUNKS)
_SEAL_FILE_READ, _SEAL_FILE_OUT = _seal_sizes(_FILE_BLOCK_CHUNKS)
_UNSEAL_FILE_READ, _UNSEAL_FILE_OUT = _unseal_sizes(_FILE_BLOCK_CHUNKS)


# --- sealing ---------------------------------------------------------------------------------


def seal_bytes(
    plaintext: Blob,
    *,
    wrapper: DataKeyWrapper,
    key_id: str,
    content_type: str = DEFAULT_CONTENT_TYPE,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Seal ``plaintext`` for the latest version of KEK ``key_id`` and return the artifact."""
    data = as_blob(plaintext, "plaintext")
    data_key, header = _new_header(wrapper, key_id, content_type, metadata)
    out = FreshBytes(header.size + payload_size(len(data)))
    try:
        out.view[: header.size] = header.encoded
        encryptor = Cobblestone256Encryptor(data_key, header.encoded)
        written = header.size + encryptor.update_into(data, out.view[header.size :])
        tail = encryptor.finalize()
        if written + len(tail) != len(out.view):
            raise CryptoError("Cobblestone-256 framing differs from what this enclaveml expects")
        out.view[written:] = tail
    except BaseException:
        out.discard()
        raise
    return out.finish()


def seal_file(
    src: PathArg,
    dst: PathArg,
    *,
    wrapper: DataKeyWrapper,
    key_id: str,
    content_type: str = DEFAULT_CONTENT_TYPE,
    metadata: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> SealedHeader:
    """Seal file ``src`` into ``dst`` in constant memory; ``dst`` appears (mode 0600) only when complete.

    ``src`` may be larger than RAM. ``dst`` is replaced atomically if it exists; ``src`` and
    ``dst`` may name the same file. Returns the header that was written.
    """
    check_progress(progress)
    dst_path = output_path(dst)
    with open_input(src) as reader:
        size = regular_file_size(reader)
        data_key, header = _new_header(wrapper, key_id, content_type, metadata)
        encryptor = Cobblestone256Encryptor(data_key, header.encoded)
        with atomic_output(dst_path) as output:
            if size is not None:
                output.expect(header.size + payload_size(size))
            with (
                input_blocks(reader, _SEAL_FILE_READ) as blocks,
                _pipeline(output, _SEAL_FILE_OUT) as pipe,
            ):
                pipe.send_bytes(header.encoded)
                done = 0
                for block in blocks:
                    out = pipe.output()
                    pipe.send(out, encryptor.update_into(block, out))
                    done += len(block)
                    if progress is not None:
                        progress(done)
                if progress is not None and done == 0:  # an empty input: its size is still the last value
                    progress(0)
                pipe.send_bytes(encryptor.finalize())
    return header


def _new_header(
    wrapper: DataKeyWrapper, key_id: str, content_type: str, metadata: Mapping[str, str] | None
) -> tuple[bytes, SealedHeader]:
    """Draw a fresh data key, wrap it bound to the header, and return both."""
    if not isinstance(wrapper, DataKeyWrapper):
        raise ConfigurationError(
            "wrapper must provide wrap_data_key() (a KeyHandle, KeyRing or broker client)"
        )
    aad = encode_wrapping_aad(key_id, content_type, metadata)
    data_key = Cobblestone256Encryptor.generate_key()
    key_version, wrapped = wrapper.wrap_data_key(key_id, data_key, aad)
    return data_key, complete_header(aad, key_version, wrapped)


# --- unsealing -------------------------------------------------------------------------------


def read_header(src: PathArg | Blob | ByteReader) -> SealedHeader:
    """Read and check an artifact's public header without any key.

    ``src`` is a path, the artifact's bytes, or a binary stream (left positioned at the
    payload). The header is *not yet authenticated*: use it to pick the key to request, and
    trust its content type and metadata only after unsealing succeeded.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        return parse_header(src)
    if isinstance(src, str | os.PathLike):
        with open_input(src) as reader:
            return read_header_from(reader)
    if not hasattr(src, "read"):
        raise ConfigurationError(
            f"read_header needs a path, bytes or a binary stream, not {type(src).__name__}"
        )
    return read_header_from(src)


def unseal_bytes(blob: Blob, *, unwrapper: DataKeyUnwrapper) -> bytes:
    """Authenticate and decrypt an in-memory artifact; on any failure no plaintext is returned or kept.

    The plaintext is decrypted into one buffer of the final size, which is zeroed and dropped
    if the final authentication check fails.
    """
    data = as_blob(blob, "blob")
    header = parse_header(data)
    size = plaintext_size(len(data) - header.size)
    decryptor = Cobblestone256Decryptor(_unwrap(header, unwrapper), header.encoded)
    out = FreshBytes(size)
    try:
        written = _update(decryptor, data[header.size :], out.view)
        _finish(decryptor, out.view, written)
    except BaseException:
        out.discard()
        raise
    return out.finish()


def unseal_file_to_bytes(
    src: PathArg, *, unwrapper: DataKeyUnwrapper, progress: Progress | None = None
) -> bytes:
    """Unseal a sealed file straight into memory (no plaintext on disk), e.g. a model for ONNX Runtime.

    Decrypts block by block (from the memory-mapped file, :mod:`._input_blocks`) into one
    output buffer sized from the file size, so peak memory is the plaintext plus at most one
    block. Nothing is returned unless the whole artifact verified.
    """
    return unseal_file_with_header(src, unwrapper=unwrapper, progress=progress)[1]


def unseal_file_with_header(
    src: PathArg, *, unwrapper: DataKeyUnwrapper, progress: Progress | None = None
) -> tuple[SealedHeader, bytes]:
    """:func:`unseal_file_to_bytes`, with the header it verified: check key id, content type and
    metadata on this one, never on a header read before (the file may change in between)."""
    check_progress(progress)
    with open_input(src) as reader:
        status = os.fstat(reader.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ConfigurationError(f"{os.fspath(src)!r} is not a regular file; use unseal_stream")
        header = read_header_from(reader)
        remaining = status.st_size - header.size
        decryptor = Cobblestone256Decryptor(_unwrap(header, unwrapper), header.encoded)
        # Sized from the file before anything but the header is authenticated, so the size is the
        # host's to choose (zeros appended to a real artifact pass its first chunks): a size that
        # cannot be had is a typed error, and a failure wipes only what was written, never
        # touching (and so never committing) the rest of a huge, mostly virtual buffer.
        try:
            out = FreshBytes(plaintext_size(remaining))
        except MemoryError:
            raise CryptoError(
                f"the plaintext of {os.fspath(src)!r} ({remaining} bytes sealed) does not fit in memory"
            ) from None
        written = 0
        try:
            done = header.size
            with input_blocks(reader, _UNSEAL_FILE_READ) as blocks:
                for block in blocks:
                    if len(block) > remaining:  # the file grew: appended bytes are not part of it
                        raise DecryptionError(AUTH_FAILED)
                    written += _update(decryptor, block, out.view[written:])
                    remaining -= len(block)
                    done += len(block)
                    if progress is not None:
                        progress(done)
            if remaining:  # the file shrank while it was read
                raise DecryptionError(AUTH_FAILED)
            _finish(decryptor, out.view, written)
        except BaseException:
            wipe(out.view[:written])
            out.discard(wipe_first=False)
            raise
    return header, out.finish()


def unseal_file(
    src: PathArg, dst: PathArg, *, unwrapper: DataKeyUnwrapper, progress: Progress | None = None
) -> SealedHeader:
    """Unseal ``src`` into ``dst`` in constant memory; ``dst`` appears only if the artifact verified.

    Plaintext is written to a file (mode 0600) next to ``dst`` that has no name where the file
    system supports ``O_TMPFILE`` (so even ``kill -9`` leaves nothing behind), and named and
    renamed onto ``dst`` only after the final chunk authenticated; on any failure the file is
    deleted and ``dst`` is left untouched. Returns the (now authenticated) header.
    """
    check_progress(progress)
    dst_path = output_path(dst)
    with open_input(src) as reader:
        size = regular_file_size(reader)
        header = read_header_from(reader)
        decryptor = Cobblestone256Decryptor(_unwrap(header, unwrapper), header.encoded)
        with atomic_output(dst_path) as output:
            if size is not None:
                with contextlib.suppress(DecryptionError):  # an impossible size fails at the end
                    output.expect(plaintext_size(size - header.size))
            with (
                input_blocks(reader, _UNSEAL_FILE_READ) as blocks,
                _pipeline(output, _UNSEAL_FILE_OUT) as pipe,
            ):
                done = header.size
                for block in blocks:
                    out = pipe.output()
                    pipe.send(out, _update(decryptor, block, out))
                    done += len(block)
                    if progress is not None:
                        progress(done)
                # Only a verified final chunk lets the block end normally, and only then is the
                # temporary file renamed onto dst (after the writer thread wrote everything).
                pipe.send_bytes(_final(decryptor))
    return header


def unseal_stream(
    src: PathArg | ByteReader, *, unwrapper: DataKeyUnwrapper, progress: Progress | None = None
) -> Iterator[bytes]:
    """Yield plaintext blocks as they decrypt. **The output is not authenticated until the end.**

    Every yielded block is authentic and in order, but the artifact may be *truncated*: a
    truncated or otherwise damaged artifact raises DecryptionError only after the blocks before
    the damage were yielded. Use it only where acting on a prefix is harmless (e.g. piping to a
    consumer that itself discards everything when the stream fails); otherwise use
    :func:`unseal_file` or :func:`unseal_bytes`. Errors, including a wrong key, surface on the
    first iteration.
    """
    check_progress(progress)
    if isinstance(src, str | os.PathLike):
        with open_input(src) as reader:
            yield from _unseal_stream(reader, unwrapper, progress)
    else:
        yield from _unseal_stream(src, unwrapper, progress)


def _unseal_stream(
    reader: ByteReader, unwrapper: DataKeyUnwrapper, progress: Progress | None
) -> Iterator[bytes]:
    header = read_header_from(reader)
    decryptor = Cobblestone256Decryptor(_unwrap(header, unwrapper), header.encoded)
    for block in _decrypt_blocks(reader, decryptor, progress, header.size):
        yield bytes(block)


# --- shared machinery ------------------------------------------------------------------------


def _unwrap(header: SealedHeader, unwrapper: DataKeyUnwrapper) -> bytes:
    """Unwrap the data key; a wrapped key that does not open is indistinguishable from any other
    authentication failure of the file. An unwrapper's own failures (a broker's answer that did not
    decrypt, an unknown key) keep their type and message: they are not about the file."""
    if not isinstance(unwrapper, DataKeyUnwrapper):
        raise ConfigurationError(
            "unwrapper must provide unwrap_data_key() (a KeyHandle, KeyRing or broker client)"
        )
    try:
        data_key = unwrapper.unwrap_data_key(
            header.key_id, header.key_version, header.wrapped_data_key, header.wrapping_aad
        )
    except WrappedKeyError:
        raise DecryptionError(AUTH_FAILED) from None
    if not isinstance(data_key, bytes) or len(data_key) != KEY_SIZE:
        raise DecryptionError(AUTH_FAILED)
    return data_key


def _update(decryptor: Cobblestone256Decryptor, data: Blob, out: memoryview) -> int:
    try:
        return decryptor.update_into(data, out)
    except InvalidTag:
        raise DecryptionError(AUTH_FAILED) from None


def _final(decryptor: Cobblestone256Decryptor) -> bytes:
    """Verify the final chunk (and so the whole stream) and return its plaintext."""
    try:
        return decryptor.finalize()
    except InvalidTag:
        raise DecryptionError(AUTH_FAILED) from None


def _finish(decryptor: Cobblestone256Decryptor, out: memoryview, written: int) -> None:
    """Verify the final chunk and place its plaintext at the end of ``out``, which must then be full."""
    tail = _final(decryptor)
    if written + len(tail) != len(out):
        raise DecryptionError(AUTH_FAILED)
    out[written:] = tail


def _pipeline(output: OutputFile, out_size: int) -> BlockPipeline:
    """Run the cipher in this thread, with the writes in a writer thread behind it."""
    return BlockPipeline(output.write, out_size=out_size, depth=_DEPTH)


def _decrypt_blocks(
    reader: ByteReader, decryptor: Cobblestone256Decryptor, progress: Progress | None, done: int
) -> Iterator[memoryview]:
    """Yield views of one reused plaintext buffer (valid until the next step), the verified tail last."""
    in_view = memoryview(bytearray(_UNSEAL_READ))
    out_view = memoryview(bytearray(_UNSEAL_OUT))
    try:
        while count := fill(reader, in_view):
            produced = _update(decryptor, in_view[:count], out_view)
            done += count
            if progress is not None:
                progress(done)
            if produced:
                yield out_view[:produced]
        tail = _final(decryptor)
        if tail:
            yield memoryview(tail)
    finally:
        wipe(out_view)
