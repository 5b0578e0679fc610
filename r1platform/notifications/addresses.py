"""Which addresses a webhook may reach: public ones only, unless an operator allows a network.

A webhook URL is chosen by a team, and the worker that posts to it sits inside the platform's
network, next to Redis, PostgreSQL, MLflow and the cloud's metadata service. So the host is
resolved and *every* address it resolves to must be public (not loopback, private, link-local,
multicast, reserved, unspecified or a metadata address, IPv4 inside IPv6 included);
``R1_WEBHOOK_ALLOW_NETWORKS`` (CIDRs) lets an operator allow, say, an internal receiver.
Odd spellings of an address (``127.1``, ``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``) are
read the way the operating system reads them, and the delivery connects to the address that was
checked (``delivery``), so a name that resolves differently a moment later changes nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba): they hand out
# credentials to whoever asks from inside.
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
ALLOW_HINT = (
    "webhooks may only reach public addresses; an operator can allow a network with "
    "R1_WEBHOOK_ALLOW_NETWORKS"
)


class AddressRefused(Exception):
    """The host is, or resolves to, an address webhooks may not reach."""


class UnresolvedHost(Exception):
    """The host's name did not resolve (now): nothing can be said about where it points."""


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any form the system's resolver accepts, else None.

    ``127.1``, ``2130706433``, ``0x7f.1`` and ``0177.0.0.1`` all mean 127.0.0.1 to
    ``inet_aton``, which is what ``getaddrinfo`` (and so any HTTP client) uses on them.
    """
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not text or not all(c.isalnum() or c == "." for c in text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def embedded(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and every IPv4 address it carries (mapped, NAT64, 6to4, Teredo)."""
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip in NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
    return found


def allowed_networks() -> list[IPNetwork]:
    """``R1_WEBHOOK_ALLOW_NETWORKS`` (a list, or text separated by commas) as networks."""
    raw = getattr(settings, "R1_WEBHOOK_ALLOW_NETWORKS", ()) or ()
    if isinstance(raw, str):
        raw = raw.split(",")
    return list(_parse_networks(tuple(item.strip() for item in raw if item.strip())))


@lru_cache(maxsize=8)
def _parse_networks(items: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"R1_WEBHOOK_ALLOW_NETWORKS: {item!r} is not a network such as 10.1.0.0/16"
            ) from None
    return tuple(networks)


def problem(ip: IPAddress) -> str | None:
    """Why webhooks may not reach ``ip`` (None: they may)."""
    networks = allowed_networks()
    forms = embedded(ip)
    if any(form in net for form in forms for net in networks if form.version == net.version):
        return None
    for form in reversed(forms):  # the IPv4 address carried inside first: the plainer reason
        why = _kind(form)
        if why:
            return why
    return None


def _kind(ip: IPAddress) -> str | None:
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address (this machine)"
    if ip.is_loopback:
        return "a loopback address (this machine)"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a public address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` names (a literal in any spelling, or a name resolved now)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvedHost(f"could not resolve {host}: {exc}") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise UnresolvedHost(f"could not resolve {host}: no address")
    return found


def vetted(host: str, port: int) -> list[IPAddress]:
    """The addresses of ``host``, all allowed; ``AddressRefused`` if any one is not (a name
    resolving to a public and a private address could be steered to the private one)."""
    addresses = resolve(host, port)
    for ip in addresses:
        why = problem(ip)
        if why is not None:
            shown = host if str(ip) == host else f"{host} ({ip})"
            raise AddressRefused(f"{shown} is {why}: {ALLOW_HINT}")
    return addresses
