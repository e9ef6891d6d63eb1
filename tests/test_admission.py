"""The client connection table: a cap per address, and a full table that one address cannot hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from node.admission import ClientAdmission, address_key

_clock = count()


@dataclass(eq=False)
class FakeConnection:
    name: str
    quiet_since: int = field(default_factory=lambda: next(_clock))


def table(total_max: int, per_address_max: int) -> ClientAdmission[FakeConnection]:
    return ClientAdmission(total_max, per_address_max, lambda connection: connection.quiet_since)


def test_one_address_is_capped_and_the_others_still_get_in() -> None:
    clients = table(total_max=8, per_address_max=3)
    attacker = [FakeConnection(f"a{index}") for index in range(10)]
    admitted = [clients.admit(connection, "10.0.0.2")[0] for connection in attacker]
    assert admitted == [True] * 3 + [False] * 7
    assert clients.admit(FakeConnection("honest"), "10.0.0.1") == (True, None)


def test_a_full_table_evicts_the_quietest_connection_of_the_heaviest_address() -> None:
    clients = table(total_max=4, per_address_max=3)
    heavy = [FakeConnection(f"h{index}") for index in range(3)]
    for connection in heavy:
        assert clients.admit(connection, "10.0.0.2") == (True, None)
    other = FakeConnection("o")
    assert clients.admit(other, "10.0.0.3") == (True, None)
    newcomer = FakeConnection("n")
    assert clients.admit(newcomer, "10.0.0.1") == (True, heavy[0])
    assert len(clients) == 4 and clients.count("10.0.0.2") == 2
    # Now no address holds more than one more than the next newcomer's: 2 > 1 still evicts...
    assert clients.admit(FakeConnection("n2"), "10.0.0.1") == (True, heavy[1])
    # ...but an address never evicts one that holds no more than itself.
    assert clients.admit(FakeConnection("n3"), "10.0.0.1") == (False, None)
    # Fair both ways: the once-heavy address, now holding fewer, may take a place back.
    assert clients.admit(FakeConnection("h9"), "10.0.0.2") == (True, newcomer)
    clients.remove(heavy[0])  # evicted already: removing again is harmless
    assert len(clients) == 4


def test_many_attacker_addresses_cannot_lock_out_a_new_address() -> None:
    clients = table(total_max=16, per_address_max=4)
    for index in range(64):
        clients.admit(FakeConnection(f"a{index}"), f"10.0.1.{index % 8}")
    assert len(clients) == 16
    admitted, evicted = clients.admit(FakeConnection("honest"), "10.0.0.1")
    assert admitted and evicted is not None


def test_address_keys_group_ipv6_by_prefix_and_unmap_ipv4() -> None:
    assert address_key("127.0.0.2") == "127.0.0.2"
    assert address_key("::ffff:127.0.0.2") == "127.0.0.2"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"
