"""The client's address, for per-address limits (joins, sign-in throttling) and the nearest-server guess.

REMOTE_ADDR is the peer. Behind a reverse proxy every request comes from the proxy, so all clients would share one
bucket; X-Forwarded-For names the real client, but anyone can send that header. It is read only when the peer is
one of TRUSTED_PROXIES, and then from the right: each trusted proxy appends the address it saw, so the rightmost
entry that is not itself a trusted proxy is the first address no one we trust could have made up.
"""

from __future__ import annotations

import functools
import ipaddress

from django.conf import settings


@functools.lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p.strip())


def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    # An IPv4 client seen on a dual-stack socket as ::ffff:a.b.c.d is the same client as a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address, networks) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def client_address(request) -> str | None:
    """The client's address as a string, or None when there is no usable one."""
    peer = _parse(request.META.get("REMOTE_ADDR") or "")
    if peer is None:
        return None
    networks = _networks(tuple(settings.TRUSTED_PROXIES))
    if not networks or not _trusted(peer, networks):
        return str(peer)
    forwarded = (request.META.get("HTTP_X_FORWARDED_FOR") or "").split(",")
    for entry in reversed(forwarded):
        address = _parse(entry)
        if address is None:
            return str(peer)  # a malformed hop: nothing to its left can be trusted either
        if not _trusted(address, networks):
            return str(address)
    return str(peer)


def axes_client_ip(request) -> str:
    """django-axes' AXES_CLIENT_IP_CALLABLE: the same rule, so sign-in throttling and join limits agree."""
    return client_address(request) or "unknown"
