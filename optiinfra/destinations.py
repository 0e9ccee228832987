"""
Where the orchestrator may send tasks: the addresses agents may register.

An agent key chooses the address the orchestrator will C{POST} task data to, so
that address is checked twice: at registration (an IP literal, or each address
a name resolves to then) and at connect time, on the addresses a name resolves
to when the call is made (a name that later resolves elsewhere is refused then
too).  C{AGENT_ALLOWED_NETWORKS} lists the networks allowed; unset, everything
is allowed but link-local and cloud metadata addresses.  The orchestrator's own
listening address is never allowed: tasks sent to itself would loop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from zope.interface import implementer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Refused when C{AGENT_ALLOWED_NETWORKS} is unset: link-local (where the cloud
#: metadata services answer) and AWS's IPv6 metadata address.
NEVER_BY_DEFAULT: Final[tuple[Network, ...]] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
_LOOPBACK: Final[tuple[Network, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
SETTING: Final = "AGENT_ALLOWED_NETWORKS"
#: Hosts whose last refusal is remembered, for error messages.
_REMEMBERED: Final = 4096


def parse_networks(text: str) -> tuple[Network, ...]:
    """
    A comma-separated CIDR list.

    @raise ValueError: naming the entry that is not a network.
    """
    networks = []
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not a CIDR network") from None
    if not networks:
        raise ValueError("expected at least one CIDR network, e.g. 10.0.0.0/8")
    return tuple(networks)


def tls_available() -> bool:
    """Whether C{https} agents can be called: the C{tls} extra is installed."""
    try:
        import service_identity  # noqa: F401
        from twisted.internet import ssl  # noqa: F401
    except ImportError:
        return False
    return True


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class Destinations:
    """The rule above, for one orchestrator."""

    def __init__(self, allowed: Sequence[Network] | None = None) -> None:
        self.allowed = None if allowed is None else tuple(allowed)
        #: (addresses, port) this orchestrator listens on; set once it does.
        self._own: tuple[tuple[Network, ...], int] | None = None

    def listening(self, host: str, port: int) -> None:
        """The orchestrator listens on C{host:port} (C{0.0.0.0}/C{::}: everywhere)."""
        address = _address(host)
        if address is None or address.is_unspecified:
            own = [*_LOOPBACK, *_host_addresses()]
        else:
            own = [ipaddress.ip_network(address), *_LOOPBACK]
        self._own = (tuple(own), port)

    def refusal(self, host: str, port: int) -> str | None:
        """Why C{host:port} (an IP address) may not be called; None if it may."""
        address = _address(host)
        if address is None:
            return None  # a name: its addresses are checked when resolved
        if self._own is not None:
            own, own_port = self._own
            if port == own_port and any(address in n for n in own):
                return f"{host}:{port} is this orchestrator's own address"
        if self.allowed is not None:
            if any(address in n for n in self.allowed):
                return None
            return f"{host} is not in {SETTING}"
        if any(address in n for n in NEVER_BY_DEFAULT):
            return (
                f"{host} is a link-local or cloud metadata address, never allowed "
                f"unless {SETTING} says so"
            )
        return None


def _host_addresses() -> list[Network]:
    """This host's addresses, as far as its own name resolves."""
    found: list[Network] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return found
    for info in infos:
        address = _address(str(info[4][0]))
        if address is not None:
            found.append(ipaddress.ip_network(address))
    return found


@implementer(IResolutionReceiver)
class _Collect:
    """Passes on the addresses C{keep} allows; hands the others' reasons on."""

    def __init__(
        self,
        receiver: IResolutionReceiver | None,
        keep: Callable[[str], str | None],
        refused: Callable[[list[str], list[str]], None],
    ) -> None:
        self._receiver = receiver
        self._keep = keep
        self._refused = refused
        self.kept: list[str] = []
        self.reasons: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:  # noqa: N803
        if self._receiver is not None:
            self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, IPv4Address | IPv6Address):
            reason = self._keep(address.host)
            if reason is not None:
                self.reasons.append(reason)
                return
            self.kept.append(address.host)
        if self._receiver is not None:
            self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._refused(self.kept, self.reasons)
        if self._receiver is not None:
            self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class CheckingResolver:
    """
    A resolver that drops the addresses the policy refuses, so a connection is
    only ever made to an allowed one; the last refusal per host is kept, for
    the error to say why a call found no address.
    """

    def __init__(self, resolver: IHostnameResolver, policy: Destinations) -> None:
        self._resolver = resolver
        self._policy = policy
        self.refused: dict[str, str] = {}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Sequence[type[IAddress]] | None = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IHostResolution:
        def remember(kept: list[str], reasons: list[str]) -> None:
            if reasons and not kept:
                if len(self.refused) >= _REMEMBERED:
                    self.refused.clear()
                self.refused[hostName] = f"{hostName}: {reasons[-1]}"

        collect = _Collect(
            resolutionReceiver,
            lambda host: self._policy.refusal(host, portNumber),
            remember,
        )
        return self._resolver.resolveHostName(
            collect, hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IReactorPluggableNameResolver)
class CheckedReactor:
    """
    The reactor, but resolving names through a L{CheckingResolver}: what
    L{twisted.internet.endpoints.HostnameEndpoint} is given, so that every
    address it connects to was checked.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


async def registration_refusal(
    policy: Destinations, resolver: IHostnameResolver, host: str, port: int
) -> str | None:
    """
    Why an agent may not register at C{host:port}: its address, or any address
    its name resolves to now, is refused.  A name that does not resolve yet is
    let through: it is checked again at every call.
    """
    if _address(host) is not None:
        return policy.refusal(host, port)
    done: Deferred[list[str]] = Deferred()
    collect = _Collect(
        None,
        lambda address: policy.refusal(address, port),
        lambda kept, reasons: done.callback(reasons),
    )
    resolver.resolveHostName(collect, host, port)
    reasons = await done
    return f"{host} resolves to an address refused: {reasons[0]}" if reasons else None
