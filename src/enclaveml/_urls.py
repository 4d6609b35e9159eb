"""URL pieces shared by the servers and clients."""

from __future__ import annotations

__all__ = ["url_host"]


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: IPv6 literals (``::1``) in brackets (RFC 3986)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
