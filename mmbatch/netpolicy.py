"""Where webhooks may go: never to this service's own network unless an operator allows it.

A leaf module (standard library only): the API checks a callback URL when a job is submitted,
and the worker checks it again, against the addresses the name resolves to at delivery time, so
a name that later resolves to a private address (DNS rebinding) is still refused.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class DestinationRefused(ValueError):
    pass


def parse_allow(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network | str]:
    """``MMBATCH_WEBHOOK_ALLOW``: comma-separated host names, addresses or CIDRs."""
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network | str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            allowed.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            allowed.append(part.lower())
    return allowed


def check_url(url: str, allow: str = "", resolve: bool = True) -> list[str]:
    """Raise DestinationRefused unless ``url`` may be called; returns the addresses it checked."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise DestinationRefused("callback_url must be an http or https URL")
    if not parts.hostname:
        raise DestinationRefused("callback_url has no host")
    if parts.username or parts.password:
        raise DestinationRefused("callback_url must not carry credentials")
    host = parts.hostname.lower()
    allowed = parse_allow(allow)
    if host in allowed:
        return []
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not resolve:
            return []
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise DestinationRefused(f"callback_url host {host!r} does not resolve") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for addr in addresses:
        if _is_internal(addr) and not any(isinstance(a, (ipaddress.IPv4Network,
                                                         ipaddress.IPv6Network))
                                          and addr in a for a in allowed):
            raise DestinationRefused(
                f"callback_url resolves to {addr}, a private, loopback or link-local address; "
                "an operator can allow it with MMBATCH_WEBHOOK_ALLOW")
    return [str(a) for a in addresses]


def _is_internal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
            or addr.is_reserved or addr.is_unspecified)
