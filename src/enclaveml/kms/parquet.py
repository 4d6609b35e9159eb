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
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from datetime import timedelta

import pyarrow.dataset as ds  # type: ignore[import-untyped]
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
]

_PREFIX = "kbs1:"
_AAD = b"enclaveml-parquet-v1\x00"
_DEFAULT_CACHE = timedelta(minutes=10)


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
