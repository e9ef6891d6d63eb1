"""`ledger-client status` reports each replica's version, uptime, connected peers and store size."""

from __future__ import annotations

import pytest
import trio

from client.library import Client, ReplicaStatus
from ledger.version import package_version

from .local_network import STATUS_POLL_INTERVAL_S, LocalNetwork, run_client_cli

pytestmark = pytest.mark.integration

MESHED_DEADLINE_S = 30.0


async def wait_until_meshed(client: Client, replica_count: int) -> list[ReplicaStatus]:
    """Poll status until every replica answers and is connected both ways to all n-1 others."""
    statuses: list[ReplicaStatus] = []
    try:
        with trio.fail_after(MESHED_DEADLINE_S):
            while True:
                statuses = await client.status(wait_s=1.0)
                if all(status.reachable and status.connected_peers == replica_count - 1 for status in statuses):
                    return statuses
                await trio.sleep(STATUS_POLL_INTERVAL_S)
    except trio.TooSlowError:
        raise AssertionError(f"replicas did not all connect to each other: {statuses}") from None


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_status_reports_version_uptime_peers_and_store_size(network: LocalNetwork, client: Client, replica_count: int) -> None:
    statuses = await wait_until_meshed(client, replica_count)
    for status in statuses:
        assert status.version == package_version(), status
        assert status.uptime_s >= 0, status
        # An opened store holds at least its schema: one SQLite page or more, in the file or its WAL.
        assert status.store_size_bytes >= 512, status
        assert network.store_path(status.replica_id).exists()

    put = await run_client_cli(network, "put", "status-key", "value")
    assert put.exit_code == 0, put.describe()

    as_json = await run_client_cli(network, "status", "--json")
    assert as_json.exit_code == 0, as_json.describe()
    for entry in as_json.json()["replicas"]:
        assert entry["version"] == package_version(), entry
        assert entry["uptime_s"] >= 0, entry
        assert 0 <= entry["connected_peers"] <= replica_count - 1, entry
        assert entry["store_size_bytes"] > 0, entry

    as_text = await run_client_cli(network, "status")
    assert as_text.exit_code == 0, as_text.describe()
    header, *rows = as_text.stdout.splitlines()[1:]
    for column in ("peers", "uptime", "store", "version"):
        assert column in header, as_text.stdout
    assert len(rows) == replica_count, as_text.stdout
    assert all(row.rstrip().endswith(package_version()) for row in rows), as_text.stdout
