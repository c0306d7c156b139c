"""Outbound HTTP that cannot be pointed at the platform's own network: the SSRF guard.

Every URL a client gives us (inputs, asset URLs, webhooks) passes two checks that share one
normalisation of the host and one policy:

* at the API, without any DNS look-up (``refused_host_reason``): IP literals in every spelling a
  resolver accepts (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, IDNA full-width
  digits), ``localhost`` names, and IPv6 addresses that carry an IPv4 address inside;
* in the worker, on the addresses the name actually resolves to (``http_pool``): each is
  checked, and the connection dials exactly the checked address, so DNS rebinding cannot swap
  in another one. The host *name* stays the connection's host, so TLS sends it as SNI, the
  certificate is verified against it and ``Host`` names it, on fresh and reused connections.

A refusal is final (``PrivateAddressError``, ``UnresolvableHost``): retrying cannot make a private
address public. Its message never says what a name resolved to, so the guard does not map the
internal network for a client.

``AIORCH_ALLOW_PRIVATE_NETWORKS`` lets chosen private networks through the same checked, pinned
path; ``AIORCH_ALLOW_PRIVATE_URLS=1`` turns the guard off (development only);
``AIORCH_CA_BUNDLE`` adds CA certificates to the default ones (``tls_context``).
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import idna
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family, create_connection
from urllib3.util.ssl_ import create_urllib3_context

from config import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PRIVATE = "is a private or reserved address"
INVALID = "is not a valid host name"
UNRESOLVABLE = "cannot be resolved"

# Names that always mean this machine (RFC 6761), checked as the loopback addresses they are.
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")
_LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

# IPv6 prefixes whose last 32 bits (6to4: bits 16-48) are the IPv4 address really reached: the
# IPv4 address is what gets checked. Python's ``ipaddress`` calls most of these "global".
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible (::a.b.c.d)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")

# Reserved ranges that Python 3.11's ``is_global`` lets through.
_ALWAYS_REFUSED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.0.0/24",  # IETF protocol assignments (only a /29 of it is "private" to Python)
        "192.88.99.0/24",  # 6to4 relay anycast
        "fec0::/10",  # site-local, deprecated but still routed by some stacks
        "2001::/32",  # Teredo: the client address inside is obfuscated, cannot be checked
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs
        "ff00::/8",  # multicast
    )
)

# getaddrinfo errors that mean the name does not exist (final); others, EAI_AGAIN above all, are a
# DNS server's passing trouble and worth a retry.
_NO_SUCH_NAME = {
    code
    for code in (
        getattr(socket, "EAI_NONAME", None),
        getattr(socket, "EAI_NODATA", None),
        getattr(socket, "EAI_ADDRFAMILY", None),
    )
    if code is not None
}


_IPV4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class PrivateAddressError(urllib3.exceptions.HTTPError):
    """The host may not be contacted: private or reserved, or no valid or existing host name at
    all. Final: never retried.

    ``reason`` completes "the host ..." and never contains a resolved address.
    """

    def __init__(self, reason: str = PRIVATE):
        super().__init__(f"refused: the host {reason}")
        self.reason = reason


class UnresolvableHost(PrivateAddressError):
    """The name does not exist (NXDOMAIN): as final as a private address, reported differently."""

    def __init__(self) -> None:
        super().__init__(UNRESOLVABLE)


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as an IPv4 address the way ``inet_aton`` (and the WHATWG URL standard) reads it:
    one to four parts, each decimal, octal (leading 0) or hex (0x). None when the host does not
    end in a number, so it is a name; ValueError when it does but is no valid address."""
    parts = host.split(".")
    if not _IPV4_PART.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_IPV4_PART.match(p) for p in parts):
        raise ValueError(host)
    numbers = []
    for part in parts:
        if part[:2].lower() == "0x":
            numbers.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            numbers.append(int(part, 8))  # ValueError for 08, 09: inet_aton refuses those too
        else:
            numbers.append(int(part))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(host)
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def normalise_host(host: str) -> Address | str:
    """The address a URL's host stands for, or its name in canonical form (ASCII, lower case, no
    trailing dot). Raises ValueError for a host no resolver would accept."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:  # only IPv6 literals have colons once the port is gone
        return ipaddress.IPv6Address(host.split("%", 1)[0])
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError("empty host")
    if not host.isascii():
        try:
            # UTS 46 maps full-width digits and dots too, so "１２７．０．０．１" is 127.0.0.1.
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(str(exc)) from None
    host = host.lower()
    address = _ipv4_literal(host)
    return address if address is not None else host


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a mapping or a transition mechanism."""
    if address in _MAPPED or address in _TRANSLATED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _COMPATIBLE and int(address) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def _is_public(address: Address) -> bool:
    return (
        address.is_global
        and not address.is_multicast
        and not any(address in network for network in _ALWAYS_REFUSED)
    )


@dataclass(frozen=True)
class UrlPolicy:
    """Which hosts outbound requests may reach; hashable, so schemas can be cached per policy.

    ``guard`` off (``AIORCH_ALLOW_PRIVATE_URLS=1``) allows everything. ``allowed_networks``
    (``AIORCH_ALLOW_PRIVATE_NETWORKS``) are let through even though private; an IPv6 address
    with an IPv4 address inside is judged by the IPv4 address.
    """

    guard: bool = True
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlPolicy:
        return cls(
            guard=not settings.allow_private_urls,
            allowed_networks=tuple(ipaddress.ip_network(n) for n in settings.allow_private_networks),
        )

    def allows_address(self, address: Address) -> bool:
        if not self.guard:
            return True
        if isinstance(address, ipaddress.IPv6Address):
            embedded = embedded_ipv4(address)
            if embedded is not None:
                address = embedded
        if any(address in network for network in self.allowed_networks):
            return True
        return _is_public(address)

    def host_refusal(self, host: str) -> str | None:
        """Why ``host`` is refused without resolving it (``PRIVATE``/``INVALID``), or None."""
        if not self.guard:
            return None
        try:
            normal = normalise_host(host)
        except ValueError:
            return INVALID
        if isinstance(normal, str):
            if normal in _LOOPBACK_NAMES or normal.endswith(".localhost"):
                return None if all(map(self.allows_address, _LOOPBACK_ADDRESSES)) else PRIVATE
            return None
        return None if self.allows_address(normal) else PRIVATE

    def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to dial for ``host``, every one of them checked. Raises
        PrivateAddressError (final), or ``socket.gaierror`` for a DNS failure worth retrying."""
        reason = self.host_refusal(host)
        if reason is not None:
            raise PrivateAddressError(reason)
        normal = normalise_host(host)
        if not isinstance(normal, str):
            return [str(normal)]
        try:
            infos = socket.getaddrinfo(normal, port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                raise UnresolvableHost() from None
            raise
        addresses: list[str] = []
        for *_, sockaddr in infos:
            raw = sockaddr[0]
            # A Python built without IPv6 reports an AF_INET6 address as (int, bytes): it can be
            # neither checked nor dialled, so it is refused like a private one.
            if not isinstance(raw, str):
                raise PrivateAddressError(PRIVATE)
            address = ipaddress.ip_address(raw.split("%", 1)[0])
            # One refused answer refuses the name: a name that resolves to both a public and a
            # private address is a rebinding attempt, not a server to try the public half of.
            if not self.allows_address(address):
                raise PrivateAddressError(PRIVATE)
            if raw not in addresses:
                addresses.append(raw)
        if not addresses:
            raise UnresolvableHost()
        return addresses


def refused_host_reason(host: str, policy: UrlPolicy) -> str | None:
    """The API's check of a URL's host, without DNS: why it is refused, or None. The worker's
    check on the resolved addresses (``http_pool``) uses the same normalisation and policy."""
    return policy.host_refusal(host)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for outbound https: the default CA store plus ``AIORCH_CA_BUNDLE``.

    None when no bundle is configured, so urllib3 and requests keep their own defaults.
    """
    if settings.ca_bundle is None:
        return None
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    # Given a context, urllib3 loads no default certificates itself: the bundle is added to
    # the system's store, not put in its place.
    context.load_default_certs()
    context.load_verify_locations(cafile=str(settings.ca_bundle))
    return context


class _PinnedMixin:
    """Resolve once, check every address, then dial exactly a checked address.

    Only the socket's destination changes: ``host`` (and urllib3's ``_dns_host`` behind it) keeps
    the name, so SNI, the certificate check and the ``Host`` header name it on every request.
    """

    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    def __init__(self, *args: Any, url_policy: UrlPolicy, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.url_policy = url_policy

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.url_policy.addresses(self.host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        error: OSError | None = None
        for address in addresses:
            try:
                return create_connection(
                    (address, self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except TimeoutError as exc:
                raise ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                ) from exc
            except OSError as exc:
                error = exc  # the next checked address may answer
        # The OS error says why ("Connection refused"), never which address was tried.
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")  # type: ignore[arg-type]


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class _GuardedPoolManager(urllib3.PoolManager):
    """Hands the policy to every connection: urllib3 passes unknown pool arguments on to the
    connection class, but its pool keys refuse them, so it is added here, after the key."""

    def __init__(self, url_policy: UrlPolicy, **kwargs: Any):
        super().__init__(**kwargs)
        self.url_policy = url_policy
        self.pool_classes_by_scheme = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["url_policy"] = self.url_policy
        return super()._new_pool(scheme, host, port, context)


def http_pool(settings: Settings) -> urllib3.PoolManager:
    """The pool for requests to client-given URLs (inputs, webhooks): guarded as the settings
    say, trusting ``AIORCH_CA_BUNDLE`` besides the default CAs, never retrying by itself."""
    kwargs: dict[str, Any] = {"num_pools": 20, "maxsize": 4, "retries": False}
    context = tls_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    policy = UrlPolicy.from_settings(settings)
    if not policy.guard:
        return urllib3.PoolManager(**kwargs)
    return _GuardedPoolManager(policy, **kwargs)


# What a network failure's own text says, without what only this process knows: urllib3 puts
# the connection object's repr (``_PinnedHTTPSConnection(host=..., port=...)``) or a tuple of
# exception reprs in front, and ssl the C source line behind.
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")
_SSL_LIBRARY = re.compile(r"^\[SSL(?:: [A-Z0-9_]+)?\]\s*|\s*\(_ssl\.c:\d+\)$")


def describe_network_error(exc: BaseException) -> str:
    """A failed request in words a client can act on ("the connection was refused", "TLS
    failed: certificate verify failed: self-signed certificate"), never a class name or an
    object's repr: the text ends up in job errors, API errors and webhook delivery records."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "the host name does not resolve"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before its base, ConnectTimeoutError
        reason = str(exc).rpartition("Failed to establish a new connection: ")[2]
        return f"the connection failed: {_ERRNO.sub('', reason).lower() or 'no answer'}"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connecting timed out"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "waiting for the answer timed out"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return f"TLS failed: {tls_failure_reason(exc)}"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        if isinstance(inner, http.client.IncompleteRead):
            return "the answer ended before its declared length"
        if isinstance(inner, OSError) and inner.strerror:
            return f"the connection broke off: {inner.strerror.lower()}"
        return "the connection was closed before the answer was complete"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return "the request failed"


def tls_failure_reason(exc: urllib3.exceptions.SSLError) -> str:
    """Why a TLS handshake failed, as ssl says it ("certificate verify failed: self-signed
    certificate", "wrong version number"), without its library tag and C source line."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    return _SSL_LIBRARY.sub("", str(inner)) or "the handshake failed"
