"""Requests the server makes on a client's behalf (webhooks; remote images later) reach
only where a deployment allows: https, public addresses, allow-listed hosts.

A URL is checked when it is registered and again at every request: the host is resolved,
every address it resolves to must be public (not loopback, private, link-local, the
cloud metadata address, multicast or reserved) unless the host is allow-listed, and the
connection goes to the address that was checked (the Host header and TLS name stay the
host's), so a DNS answer that changes between check and connect cannot redirect it.
Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from serve_app.config import OutboundPolicy


class Refused(ValueError):
    """A URL the policy does not allow, with the reason."""


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`), and the URL as the host sees it."""

    url: str
    host: str
    address: str
    port: int
    scheme: str

    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address."""
        parts = urlsplit(self.url)
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{addr}:{self.port}").geturl()


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def check_syntax(url: str, policy: OutboundPolicy) -> tuple[str, str, int]:
    """The scheme, host and port of a URL the policy may allow; `Refused` if not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a valid URL: {exc}") from None
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parts.scheme not in schemes:
        raise Refused(f"only {' or '.join(schemes)} URLs are allowed")
    if not parts.hostname:
        raise Refused("the URL names no host")
    if parts.username or parts.password:
        raise Refused("URLs with credentials are not allowed")
    if policy.allowed_hosts and not host_allowed(parts.hostname, policy.allowed_hosts):
        raise Refused(f"host {parts.hostname!r} is not allow-listed")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str, policy: OutboundPolicy) -> Target:
    """The checked target of `url`; `Refused` where the policy forbids it."""
    scheme, host, port = check_syntax(url, policy)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(f"host {host!r} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    trusted = host_allowed(host, policy.allowed_hosts)
    if not trusted and not all(public(a) for a in addresses):
        raise Refused(f"host {host!r} resolves to a non-public address")
    return Target(url, host, addresses[0], port, scheme)
