"""`ledger-scenario run --hosts`: one network namespace per replica process, on a bridge the runner makes and removes.

Each replica process gets a namespace of its own with one veth pair: one end inside, holding the
replica's address in a private /24 (10.213.X.0/24), the other end on a bridge in the runner's
namespace, which holds X.1 (where the link proxies and the clients run). A partition takes the
bridge end of the replica's veth down: its peers and its clients lose it, as with a host whose
cable is pulled. Delays stay in the proxy (tc netem is not available on every machine).

Everything made here is named with the prefix `lsn` and a tag random to this run, recorded as it
is made, and removed in reverse order by `remove` (the runner calls it in a `finally`, so also on
Ctrl-C and on failure); nothing it did not make is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

SUBNET_PREFIX = "10.213"
BRIDGE_HOST = 1
FIRST_REPLICA_HOST = 10
HOSTS_MAX = 64  # replica processes one run may put in namespaces (n = 7 plus twins is 9)
SUBNET_PICKS_MAX = 32
COMMAND_TIMEOUT_S = 10.0
NAME_PREFIX = "lsn"


class HostNetworkError(Exception):
    """The namespaces, veths or bridge could not be made; one line naming the command that failed."""


def hosts_mode_refusal() -> str | None:
    """Why --hosts cannot run here (not root, no `ip`), or None."""
    if shutil.which("ip") is None:
        return "--hosts needs the `ip` command (iproute2), which is not installed here"
    if os.geteuid() != 0:
        return "--hosts makes network namespaces, veth pairs and a bridge: run it as root (or leave out --hosts)"
    return None


def _run(arguments: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(arguments), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HostNetworkError(f"`{' '.join(arguments)}` failed: {error}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise HostNetworkError(f"`{' '.join(arguments)}` failed: {detail[0] if detail else f'exit status {result.returncode}'}")
    return result.stdout


class HostNetwork:
    """`count` hosts (network namespaces) on one bridge; made by `create`, undone by `remove`."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= HOSTS_MAX:
            raise HostNetworkError(f"{count} hosts: between 1 and {HOSTS_MAX} are supported")
        self.count = count
        self.tag = secrets.token_hex(3)
        self.bridge = f"{NAME_PREFIX}{self.tag}b"
        self.subnet_octet: int | None = None
        self.created: list[tuple[str, str]] = []  # ("netns" | "link", name), in the order made

    def namespace(self, index: int) -> str:
        return f"{NAME_PREFIX}-{self.tag}-{index}"

    def bridge_end(self, index: int) -> str:
        return f"{NAME_PREFIX}{self.tag}h{index}"

    def inside_end(self, index: int) -> str:
        return f"{NAME_PREFIX}{self.tag}n{index}"

    @property
    def bridge_address(self) -> str:
        return self._address(BRIDGE_HOST)

    def address(self, index: int) -> str:
        return self._address(FIRST_REPLICA_HOST + index)

    def _address(self, host: int) -> str:
        if self.subnet_octet is None:
            raise HostNetworkError("the host network is not created yet")
        return f"{SUBNET_PREFIX}.{self.subnet_octet}.{host}"

    def command_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(index)]

    def _pick_subnet(self) -> int:
        """A 10.213.X.0/24 no address or route here uses yet (another run's, or anything else)."""
        in_use = _run(["ip", "-4", "-o", "addr", "show"]) + _run(["ip", "-4", "route", "show"])
        for _ in range(SUBNET_PICKS_MAX):
            octet = secrets.randbelow(254) + 1
            if f"{SUBNET_PREFIX}.{octet}." not in in_use:
                return octet
        raise HostNetworkError(f"no free {SUBNET_PREFIX}.X.0/24 subnet found after {SUBNET_PICKS_MAX} picks")

    def create(self) -> None:
        """Make the bridge and every namespace; on failure, what was made stays recorded for `remove`."""
        self.subnet_octet = self._pick_subnet()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.created.append(("link", self.bridge))
        _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for index in range(self.count):
            namespace, outside, inside = self.namespace(index), self.bridge_end(index), self.inside_end(index)
            _run(["ip", "netns", "add", namespace])
            self.created.append(("netns", namespace))
            _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
            self.created.append(("link", outside))  # deleting one end deletes the pair
            _run(["ip", "link", "set", inside, "netns", namespace])
            _run(["ip", "link", "set", outside, "master", self.bridge])
            _run(["ip", "link", "set", outside, "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.address(index)}/24", "dev", inside])
            _run(["ip", "-n", namespace, "link", "set", inside, "up"])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    async def set_connected(self, index: int, connected: bool) -> None:
        """Take host `index`'s link down (a partition) or bring it back up (a heal)."""
        arguments = ["ip", "link", "set", self.bridge_end(index), "up" if connected else "down"]
        try:
            with trio.fail_after(COMMAND_TIMEOUT_S):
                await trio.run_process(arguments, capture_stdout=True, capture_stderr=True)
        except (OSError, subprocess.CalledProcessError, trio.TooSlowError) as error:
            raise HostNetworkError(f"`{' '.join(arguments)}` failed: {error}") from None

    def link_state(self, index: int) -> str:
        """The kernel's operstate of host `index`'s bridge end ("up", "down", ...), "absent" if there is none."""
        try:
            return Path(f"/sys/class/net/{self.bridge_end(index)}/operstate").read_text().strip()
        except OSError:
            return "absent"

    def remove(self) -> list[str]:
        """Remove everything `create` made, newest first; the problems met (each one line), if any."""
        problems = []
        for kind, name in reversed(self.created):
            arguments = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del", name]
            try:
                _run(arguments)
            except HostNetworkError as error:
                # A veth end goes with its namespace: already gone is what we wanted.
                if kind == "link" and not self._link_exists(name):
                    continue
                problems.append(str(error))
        self.created.clear()
        return problems

    @staticmethod
    def _link_exists(name: str) -> bool:
        try:
            _run(["ip", "link", "show", name])
        except HostNetworkError:
            return False
        return True
