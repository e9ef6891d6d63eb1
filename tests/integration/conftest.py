"""Fixtures for the integration tests: a network directory on free ports, `ledger-node up`, a client."""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from client.library import Client, open_client

from .local_network import GeneratedNetwork, LocalNetwork, generate_network, pick_base_port

READY_DEADLINE_S = 30.0


@pytest.fixture(autouse=True, scope="session")
def children_take_ctrl_c() -> None:
    """Let the processes these tests start feel SIGINT, however the suite was started.

    A shell that starts `make test` in the background without job control (`make test &` in a
    script, `nohup`) starts it with SIGINT ignored, and every process it starts inherits that
    through exec: Python and Trio then leave SIGINT ignored, as Unix tools must. The tests that
    press Ctrl-C on a client, a watch or a scenario run then waited for their deadlines and failed.
    A Python handler here becomes the default action in each child, which installs its own.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=[4, 7], ids=["n4", "n7"])
def replica_count(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def generated_network(tmp_path: Path, replica_count: int) -> GeneratedNetwork:
    """Keys and configs for a network that is never started: for checks that need no processes."""
    return generate_network(tmp_path / "net", replica_count)


@pytest.fixture
async def initialised_network(tmp_path: Path, replica_count: int, nursery: trio.Nursery) -> AsyncIterator[LocalNetwork]:
    """Keys and configs written by `ledger-node init` on free ports; not started (stopped at teardown if it was)."""
    network = LocalNetwork(tmp_path / "net", replica_count, nursery)
    await network.initialise(pick_base_port(replica_count, random.Random()))
    try:
        yield network
    finally:
        await network.stop()


@pytest.fixture
async def network(tmp_path: Path, replica_count: int, nursery: trio.Nursery) -> AsyncIterator[LocalNetwork]:
    """A running `ledger-node up`; stopped (and, failing that, killed) at teardown, whatever happened."""
    local = LocalNetwork(tmp_path / "net", replica_count, nursery)
    try:
        await local.create_and_start()
        yield local
    finally:
        await local.stop()
    leaked = [process for run in local.runs for process in run.leaked_processes.values()]
    assert not leaked, f"processes outlived `ledger-node up` (killed now): {leaked}"


@pytest.fixture
async def client(network: LocalNetwork) -> AsyncIterator[Client]:
    """A library client acting as the network's funded account, once every replica answers."""
    async with open_client(network.client_config_path) as connected:
        await connected.wait_until_ready(deadline_s=READY_DEADLINE_S)
        yield connected
