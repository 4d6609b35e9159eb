"""URL and server-name pieces shared by the servers and clients."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["certificate_names", "url_host"]

_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 literals (``::1``) in brackets (RFC 3986)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def certificate_names(host: str, extra: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) a server's certificate names so standard clients can check it.

    Always ``localhost``, 127.0.0.1 and ::1; then the listen address ``host`` and each of
    ``extra`` (the names clients will use), sorted into DNS names and IP literals: TLS clients
    match an IP address only against an iPAddress entry. Unspecified addresses (0.0.0.0, ::) are
    no name a client can connect to and are left out.
    """
    dns: list[str] = list(_LOOPBACK_NAMES)
    ips: list[str] = list(_LOOPBACK_IPS)
    for name in (host, *extra):
        name = name.strip().strip("[]")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            if name and name not in dns:
                dns.append(name)
            continue
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    return tuple(dns), tuple(ips)
