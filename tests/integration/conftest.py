"""Fixtures for the integration tests: a network directory on free ports, `ledger-node up`, a client."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from client.library import Client, open_client

from .local_network import GeneratedNetwork, LocalNetwork, generate_network, pick_base_port

READY_DEADLINE_S = 30.0


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
