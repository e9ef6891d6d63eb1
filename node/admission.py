"""Which client connections a replica keeps: a cap per address and in total, so no one address holds the table."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Generic, TypeVar

Connection = TypeVar("Connection")

IPV6_PREFIX_LENGTH = 64  # one IPv6 host is given a /64: count it as one address


def address_key(host: str) -> str:
    """The address a connection counts against: the IPv4 address, or the IPv6 /64 it comes from."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_LENGTH), strict=False))
    return str(address)


class ClientAdmission(Generic[Connection]):
    """The table of open client connections, by address.

    A newcomer is refused when its address already holds `per_address_max` connections. When the
    table holds `total_max`, the newcomer takes the place of the quietest connection of the
    address holding the most, but only if that address holds more than the newcomer's does: so
    one address (or a few) can never lock the others out, and a full table stays fair.
    """

    def __init__(self, total_max: int, per_address_max: int, quiet_since: Callable[[Connection], float]) -> None:
        self.total_max = total_max
        self.per_address_max = per_address_max
        self.quiet_since = quiet_since
        self.by_address: dict[str, dict[Connection, None]] = {}
        self.address_of: dict[Connection, str] = {}
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.address_of)

    def count(self, address: str) -> int:
        return len(self.by_address.get(address, ()))

    def admit(self, connection: Connection, address: str) -> tuple[bool, Connection | None]:
        """Add `connection` if it may open: (admitted, the connection it evicted, to be closed)."""
        held = self.count(address)
        if held >= self.per_address_max:
            self.refused += 1
            return False, None
        victim: Connection | None = None
        if len(self) >= self.total_max:
            heaviest = max(self.by_address, key=lambda key: len(self.by_address[key]))
            if len(self.by_address[heaviest]) <= held:
                self.refused += 1
                return False, None
            victim = min(self.by_address[heaviest], key=self.quiet_since)
            self.remove(victim)
            self.evicted += 1
        self.by_address.setdefault(address, {})[connection] = None
        self.address_of[connection] = address
        return True, victim

    def remove(self, connection: Connection) -> None:
        """Forget a connection (idempotent: it may have been evicted before it closed)."""
        address = self.address_of.pop(connection, None)
        if address is None:
            return
        peers = self.by_address[address]
        del peers[connection]
        if not peers:
            del self.by_address[address]
