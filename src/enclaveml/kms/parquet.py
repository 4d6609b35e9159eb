"""Parquet modular encryption whose master keys live in the enclaveml key broker.

Parquet encrypts the footer and each column with data keys it makes itself; with the default
double wrapping those are wrapped by per-file key-encryption keys, which are in turn wrapped by
*master keys* named in the :class:`~pyarrow.parquet.encryption.EncryptionConfiguration`. Here a
master key identifier is a broker key id, and :class:`BrokerKmsClient` is the bridge:

* writer side (data owner): ``wrap_key`` asks the broker's admin wrap endpoint
  (:class:`~enclaveml.kms.admin.KeyBrokerAdmin`, scope ``keys:wrap``) to wrap under the key's
  latest version; the data owner never holds the master key;
* reader side (attested workload): ``unwrap_key`` releases that version to the TEE through
  :class:`~enclaveml.kms.client.KeyBrokerClient` (cached per version) and unwraps locally.
  A workload whose evidence fails the key's policy gets no key and so no rows.

Wrapped-key string (what pyarrow stores in the file's key material), ASCII::

    "kbs1:" version (decimal) ":" key_id ":" base64(wrap_key(KEK_version, key_bytes, aad))
    aad = "enclaveml-parquet-v1" || 0x00 || key_id (UTF-8)

The key id may contain ``:``; the version is the first field and the base64 text (which has no
``:``) the last, so parsing is unambiguous. The aad ties each wrapped key to its master key
identifier, so a wrapped key copied under another column's identifier does not unwrap.

Two pyarrow behaviours the property helpers below inherit, and the whole-file helpers
(:func:`write_table`, :func:`write_dataset`, :func:`read_table`, :func:`open_dataset`) close:

* with ``column_keys``, a column that no key lists is written **in plaintext** (Parquet's
  "plaintext columns"); the writers here refuse a table with such a column unless it is named
  in ``plaintext_columns``;
* decryption properties also read **unencrypted** files, without asking for any key: a host
  that puts a plaintext file in place of an encrypted one, or beside them in a dataset, would
  feed the workload its own rows. The readers here refuse every file whose footer is not
  encrypted (trailer magic ``PARE``), before any row is read.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.dataset as ds  # type: ignore[import-untyped]
import pyarrow.fs as pafs  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pyarrow.parquet.encryption as pe  # type: ignore[import-untyped]

from enclaveml.crypto.keys import DataKeyUnwrapper, DataKeyWrapper
from enclaveml.errors import ConfigurationError, DecryptionError

__all__ = [
    "BrokerKmsClient",
    "crypto_factory",
    "dataset_format",
    "dataset_write_options",
    "decryption_config",
    "decryption_properties",
    "encryption_config",
    "encryption_properties",
    "kms_connection_config",
    "open_dataset",
    "read_table",
    "write_dataset",
    "write_table",
]

_PREFIX = "kbs1:"
_AAD = b"enclaveml-parquet-v1\x00"
_DEFAULT_CACHE = timedelta(minutes=10)
_ENCRYPTED_FOOTER_MAGIC = b"PARE"


def _aad(key_id: str) -> bytes:
    return _AAD + key_id.encode("utf-8")


def _encode(key_id: str, version: int, wrapped: bytes) -> str:
    return f"{_PREFIX}{version}:{key_id}:{base64.b64encode(wrapped).decode('ascii')}"


def _decode(text: str) -> tuple[str, int, bytes]:
    """Parse a wrapped-key string; anything malformed is a DecryptionError saying only that."""
    try:
        if not text.startswith(_PREFIX):
            raise ValueError("prefix")
        version_text, rest = text[len(_PREFIX) :].split(":", 1)
        key_id, wrapped = rest.rsplit(":", 1)
        version = int(version_text)
        if version < 1 or not key_id:
            raise ValueError("fields")
        return key_id, version, base64.b64decode(wrapped, validate=True)
    except (ValueError, binascii.Error):
        raise DecryptionError("invalid enclaveml Parquet wrapped key") from None


class BrokerKmsClient(pe.KmsClient):  # type: ignore[misc]  # pyarrow ships no type information
    """A pyarrow KMS client whose master keys are broker keys.

    Give ``wrapper`` to write (a :class:`~enclaveml.kms.admin.KeyBrokerAdmin`), ``unwrapper``
    to read (a :class:`~enclaveml.kms.client.KeyBrokerClient`), or both.
    """

    def __init__(
        self, *, wrapper: DataKeyWrapper | None = None, unwrapper: DataKeyUnwrapper | None = None
    ) -> None:
        super().__init__()
        if wrapper is None and unwrapper is None:
            raise ConfigurationError(
                "BrokerKmsClient needs a wrapper (to write), an unwrapper (to read), or both"
            )
        self._wrapper = wrapper
        self._unwrapper = unwrapper

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        if self._wrapper is None:
            raise ConfigurationError(
                "this Parquet KMS client can only read: writing needs the broker admin client (keys:wrap)"
            )
        version, wrapped = self._wrapper.wrap_data_key(
            master_key_identifier, bytes(key_bytes), _aad(master_key_identifier)
        )
        return _encode(master_key_identifier, version, wrapped)

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        if self._unwrapper is None:
            raise ConfigurationError(
                "this Parquet KMS client can only write: reading needs an attested KeyBrokerClient"
            )
        key_id, version, wrapped = _decode(str(wrapped_key))
        if key_id != master_key_identifier:
            raise DecryptionError("invalid enclaveml Parquet wrapped key")
        return self._unwrapper.unwrap_data_key(key_id, version, wrapped, _aad(key_id))


def crypto_factory(
    *, wrapper: DataKeyWrapper | None = None, unwrapper: DataKeyUnwrapper | None = None
) -> pe.CryptoFactory:
    """A CryptoFactory whose KMS is the broker (one client shared by every file it touches)."""
    kms = BrokerKmsClient(wrapper=wrapper, unwrapper=unwrapper)
    return pe.CryptoFactory(lambda _config: kms)


def kms_connection_config(url: str = "") -> pe.KmsConnectionConfig:
    """Connection config; the broker client is already bound, so the URL is recorded for reference only."""
    return pe.KmsConnectionConfig(kms_instance_id="enclaveml-kbs", kms_instance_url=url)


def encryption_config(
    footer_key: str,
    column_keys: Mapping[str, Sequence[str]] | None = None,
    *,
    plaintext_footer: bool = False,
    cache_lifetime: timedelta = _DEFAULT_CACHE,
) -> pe.EncryptionConfiguration:
    """Encrypt the footer with broker key ``footer_key`` and each listed column with its key.

    ``column_keys`` maps a broker key id to the columns it protects. Without it every column
    is encrypted with the footer key (uniform encryption). Double wrapping stays on: the broker
    is called once per master key and file, not once per column.
    """
    if not footer_key:
        raise ConfigurationError("a footer key id is required")
    if column_keys:
        return pe.EncryptionConfiguration(
            footer_key=footer_key,
            column_keys={key: list(columns) for key, columns in column_keys.items()},
            plaintext_footer=plaintext_footer,
            cache_lifetime=cache_lifetime,
            encryption_algorithm="AES_GCM_V1",
        )
    return pe.EncryptionConfiguration(
        footer_key=footer_key,
        uniform_encryption=True,
        plaintext_footer=plaintext_footer,
        cache_lifetime=cache_lifetime,
        encryption_algorithm="AES_GCM_V1",
    )


def decryption_config(cache_lifetime: timedelta = _DEFAULT_CACHE) -> pe.DecryptionConfiguration:
    return pe.DecryptionConfiguration(cache_lifetime=cache_lifetime)


def encryption_properties(
    wrapper: DataKeyWrapper, footer_key: str, column_keys: Mapping[str, Sequence[str]] | None = None
) -> pe.FileEncryptionProperties:
    """``encryption_properties=`` for :func:`pyarrow.parquet.write_table` / ``ParquetWriter``."""
    return crypto_factory(wrapper=wrapper).file_encryption_properties(
        kms_connection_config(), encryption_config(footer_key, column_keys)
    )


def decryption_properties(unwrapper: DataKeyUnwrapper) -> pe.FileDecryptionProperties:
    """``decryption_properties=`` for :func:`pyarrow.parquet.read_table` / ``ParquetFile``."""
    return crypto_factory(unwrapper=unwrapper).file_decryption_properties(
        kms_connection_config(), decryption_config()
    )


def dataset_format(unwrapper: DataKeyUnwrapper) -> ds.ParquetFileFormat:
    """A ``pyarrow.dataset`` Parquet format that decrypts through the broker."""
    config = ds.ParquetDecryptionConfig(
        crypto_factory(unwrapper=unwrapper), kms_connection_config(), decryption_config()
    )
    return ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(decryption_config=config)
    )


def dataset_write_options(
    wrapper: DataKeyWrapper, footer_key: str, column_keys: Mapping[str, Sequence[str]] | None = None
) -> ds.ParquetFileWriteOptions:
    """``file_options=`` for :func:`pyarrow.dataset.write_dataset`, encrypting through the broker."""
    config = ds.ParquetEncryptionConfig(
        crypto_factory(wrapper=wrapper), kms_connection_config(), encryption_config(footer_key, column_keys)
    )
    return ds.ParquetFileFormat().make_write_options(encryption_config=config)


def _leaf_paths(schema: pa.Schema) -> list[str]:
    """The Parquet column paths of ``schema``'s leaves (``person.name``, ``tags.list.element``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [parquet_schema.column(i).path for i in range(len(parquet_schema))]


def _covered(path: str, names: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``names`` or lies under one (Parquet encrypts a listed group whole)."""
    return any(path == name or path.startswith(name + ".") for name in names)


def _check_columns(
    schema: pa.Schema, column_keys: Mapping[str, Sequence[str]] | None, plaintext_columns: Iterable[str]
) -> None:
    """Refuse a write that would leave a leaf column in the clear without being told so."""
    if not column_keys:
        return  # uniform encryption: every column under the footer key
    listed = [column for columns in column_keys.values() for column in columns]
    clear = list(plaintext_columns)
    unnamed = [
        path for path in _leaf_paths(schema) if not _covered(path, listed) and not _covered(path, clear)
    ]
    if unnamed:
        raise ConfigurationError(
            f"columns {unnamed} are under no column key and would be written in plaintext: list them (or a "
            "group holding them) in column_keys, or in plaintext_columns if that is meant"
        )


def write_table(
    table: pa.Table,
    where: Any,
    wrapper: DataKeyWrapper,
    footer_key: str,
    column_keys: Mapping[str, Sequence[str]] | None = None,
    *,
    plaintext_columns: Iterable[str] = (),
    **kwargs: Any,
) -> None:
    """:func:`pyarrow.parquet.write_table` encrypted through the broker; no column in the clear unasked."""
    _check_columns(table.schema, column_keys, plaintext_columns)
    properties = encryption_properties(wrapper, footer_key, column_keys)
    pq.write_table(table, where, encryption_properties=properties, **kwargs)


def write_dataset(
    data: Any,
    base_dir: Any,
    wrapper: DataKeyWrapper,
    footer_key: str,
    column_keys: Mapping[str, Sequence[str]] | None = None,
    *,
    plaintext_columns: Iterable[str] = (),
    **kwargs: Any,
) -> None:
    """:func:`pyarrow.dataset.write_dataset` as Parquet encrypted through the broker (checks as above)."""
    schema = data.schema if hasattr(data, "schema") else kwargs.get("schema")
    if schema is None:
        raise ConfigurationError("write_dataset needs data with a schema (a Table, a Dataset) or schema=")
    _check_columns(schema, column_keys, plaintext_columns)
    options = dataset_write_options(wrapper, footer_key, column_keys)
    ds.write_dataset(data, base_dir, format="parquet", file_options=options, **kwargs)


def _require_encrypted_footer(magic: bytes, path: str) -> None:
    if magic != _ENCRYPTED_FOOTER_MAGIC:
        raise DecryptionError(
            f"Parquet file {path!r} is not encrypted (no encrypted footer): refusing rows no key protects"
        )


def _require_encrypted(path: str, filesystem: pafs.FileSystem) -> None:
    """DecryptionError unless the file ends in the encrypted-footer magic (read before any row)."""
    try:
        with filesystem.open_input_file(path) as handle:
            size = handle.size()
            handle.seek(max(size - len(_ENCRYPTED_FOOTER_MAGIC), 0))
            magic = handle.read(len(_ENCRYPTED_FOOTER_MAGIC))
    except OSError as exc:
        raise ConfigurationError(f"cannot read Parquet file {path!r}: {exc}") from exc
    _require_encrypted_footer(magic, path)


def read_table(source: Any, unwrapper: DataKeyUnwrapper, **kwargs: Any) -> pa.Table:
    """:func:`pyarrow.parquet.read_table` of one file through the broker, refusing an unencrypted file.

    The file is read into memory once, checked and parsed from there, so the host cannot swap it
    between the check and the read. ``source`` is a path or URI of one file (a directory:
    :func:`open_dataset`), on ``filesystem=`` if given.
    """
    text = str(source)
    filesystem = kwargs.pop("filesystem", None)
    if filesystem is not None:
        path = text
    else:
        filesystem, path = pafs.FileSystem.from_uri(text) if "://" in text else (pafs.LocalFileSystem(), text)
    try:
        with filesystem.open_input_file(path) as handle:
            data = handle.read_buffer()
    except OSError as exc:
        raise ConfigurationError(f"cannot read Parquet file {path!r}: {exc}") from exc
    tail = data.slice(max(data.size - len(_ENCRYPTED_FOOTER_MAGIC), 0)).to_pybytes()
    _require_encrypted_footer(tail, path)
    properties = decryption_properties(unwrapper)
    return pq.read_table(pa.BufferReader(data), decryption_properties=properties, **kwargs)


def open_dataset(source: Any, unwrapper: DataKeyUnwrapper, **kwargs: Any) -> ds.Dataset:
    """:func:`pyarrow.dataset.dataset` through the broker; every file's footer must be encrypted.

    The files are checked when the dataset is opened, and read lazily later: a host that
    rewrites a checked file before the scan reads it is not stopped here (read such data with
    :func:`read_table`, which checks what it parses).
    """
    dataset = ds.dataset(source, format=dataset_format(unwrapper), **kwargs)
    for path in dataset.files:
        _require_encrypted(path, dataset.filesystem)
    return dataset
