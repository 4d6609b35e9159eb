"""The errors of vertical federated learning, all under :class:`~enclaveml.errors.EnclaveMLError`.

::

    EnclaveMLError
    └── VerticalError             a vertical-FL exchange could not go on
        ├── MessageError          a message did not decode or did not have the expected fields
        ├── ProtocolError         a party answered out of turn, or with data of the wrong size
        └── PartyFailedError      a party raised while handling a call; carries only its type name

A :class:`PartyFailedError` never carries the party's exception text: that text could contain
the party's data, and the error crosses the trust boundary to the server and the other parties.
"""

from __future__ import annotations

from enclaveml.errors import EnclaveMLError

__all__ = ["MessageError", "PartyFailedError", "ProtocolError", "VerticalError"]


class VerticalError(EnclaveMLError):
    """A vertical-FL exchange could not go on; ``status`` is the HTTP status the transport uses."""

    status = 400


class MessageError(VerticalError):
    """A message did not decode, or lacked a field the receiver needs, or had one of the wrong type."""


class ProtocolError(VerticalError):
    """A party answered out of turn, for another session, or with arrays of the wrong size."""

    status = 409


class PartyFailedError(VerticalError):
    """A party's handler raised. Only the exception's type name and the method cross over."""

    status = 500
