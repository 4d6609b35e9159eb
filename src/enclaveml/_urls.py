"""URL and server-name pieces shared by the servers and clients."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from enclaveml.errors import ConfigurationError

__all__ = ["certificate_names", "url_host"]

_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 literals (``::1``) in brackets (RFC 3986)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def certificate_names(host: str, extra: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) a server's certificate names so standard clients can check it.

    Always ``localhost``, 127.0.0.1 and ::1; then the listen address ``host`` and each of
    ``extra`` (the names clients will use), sorted into DNS names and IP literals: TLS clients
    match an IP address only against an iPAddress entry. Unspecified addresses (0.0.0.0, ::) are
    no name a client can connect to and are left out. Internationalised names go in as their
    IDNA A-labels; anything that is neither an IP address nor a host name (a port, a path) is a
    ConfigurationError.
    """
    dns: list[str] = list(_LOOPBACK_NAMES)
    ips: list[str] = list(_LOOPBACK_IPS)
    for given in (host, *extra):
        name = given.strip()
        if name.startswith("[") and name.endswith("]"):  # an IPv6 literal as URLs write it
            name = name[1:-1]
        if not name:
            continue
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            name = _dns_name(name, given)
            if name not in dns:
                dns.append(name)
            continue
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    return tuple(dns), tuple(ips)


def _dns_name(name: str, given: str) -> str:
    """``name`` as a DNS name for a certificate (IDNA A-labels), or ConfigurationError naming ``given``."""
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.rstrip(".").split(".")
    if not ascii_name or len(ascii_name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigurationError(f"{given!r} is neither an IP address nor a host name")
    return ascii_name
