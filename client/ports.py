"""Picking free loopback ports for a local network (the scenario runner's and the tests')."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from ledger.config import PORTS_PER_REPLICA

HOST = "127.0.0.1"
PORT_RANGE = (20000, 60000)
PORT_PICKS_MAX = 200


def ephemeral_ports() -> range:
    """The kernel's range for outgoing connections: a listener there can collide with one of them."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(0)


def ports_bindable(ports: range) -> bool:
    """Whether every port can be bound on 127.0.0.1 (with SO_REUSEADDR, as Trio's listeners do)."""
    probes: list[socket.socket] = []
    try:
        for port in ports:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        for probe in probes:
            probe.close()


def pick_base_port(replica_count: int, generator: random.Random) -> int | None:
    """A random base in PORT_RANGE whose 2n ports are free now, outside the kernel's outgoing range
    if possible; None if no such base turned up."""
    span = PORTS_PER_REPLICA * replica_count
    avoided = ephemeral_ports()
    bases = range(PORT_RANGE[0], PORT_RANGE[1] - span)
    candidates = [generator.choice(bases) for _ in range(PORT_PICKS_MAX)]
    preferred = [base for base in candidates if base + span <= avoided.start or base >= avoided.stop]
    for base in [*preferred, *candidates]:
        if ports_bindable(range(base, base + span)):
            return base
    return None
