"""Cryptographic recipes: key handles, data-key wrapping, and the sealed-artifact format.

Safe recipes only: ``seal_*`` / ``unseal_*`` and key handles that cannot be printed or
pickled. Raw key handling stays in private modules.
"""

from enclaveml.crypto.keys import DataKeyUnwrapper, DataKeyWrapper, KeyHandle, KeyRing
from enclaveml.crypto.sealed import (
    SealedHeader,
    read_header,
    seal_bytes,
    seal_file,
    unseal_bytes,
    unseal_file,
    unseal_file_to_bytes,
    unseal_stream,
)

__all__ = [
    "DataKeyUnwrapper",
    "DataKeyWrapper",
    "KeyHandle",
    "KeyRing",
    "SealedHeader",
    "read_header",
    "seal_bytes",
    "seal_file",
    "unseal_bytes",
    "unseal_file",
    "unseal_file_to_bytes",
    "unseal_stream",
]
