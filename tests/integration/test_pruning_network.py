"""A 4-replica network that prunes (retain_blocks): verify --from-checkpoint passes, a full verify and old reads say clearly that history is pruned, and pruned stores restart and pass `check`."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from client.library import HistoryPruned, ReplicaStatus, open_client

from .local_network import (
    NODE_COMMAND,
    LocalNetwork,
    pick_base_port,
    run_client_cli,
    run_command,
    wait_for_agreement,
)

pytestmark = pytest.mark.integration

CHECKPOINT_INTERVAL = 4
# Above the checkpoint interval: a replica that missed a block (one that connected late) fetches
# it at the next checkpoint, and it must still be kept then (further behind takes state sync).
RETAIN_BLOCKS = 6
PUTS = 30
DEADLINE_S = 120.0


@pytest.fixture
async def pruning_network(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[LocalNetwork]:
    """`ledger-node init` for 4 replicas, checkpoints every 4 blocks, each replica keeping 6."""
    network = LocalNetwork(tmp_path / "net", 4, nursery)
    await network.initialise(pick_base_port(4, random.Random()))
    for path in network.directory.glob("*.toml"):
        text = path.read_text()
        assert "checkpoint_interval = 64" in text
        text = text.replace("checkpoint_interval = 64", f"checkpoint_interval = {CHECKPOINT_INTERVAL}")
        if path.name.startswith("replica-"):
            text = f"[storage]\nretain_blocks = {RETAIN_BLOCKS}\n\n" + text
        path.write_text(text)
    try:
        await network.start()
        yield network
    finally:
        await network.stop()


async def wait_until_connected(network: LocalNetwork) -> None:
    """Every replica connected both ways to every other, so none misses the first blocks."""
    async with open_client(network.client_config_path) as client:
        with trio.fail_after(30):
            while True:
                statuses = await client.status(wait_s=1.0)
                if all(status.reachable and status.connected_peers == network.replica_count - 1 for status in statuses):
                    return
                await trio.sleep(0.05)


async def wait_for_pruning(network: LocalNetwork, minimum_base: int) -> list[ReplicaStatus]:
    async with open_client(network.client_config_path) as client:
        with trio.fail_after(30):
            while True:
                statuses = await client.status(wait_s=1.0)
                if all(status.reachable and status.base_height >= minimum_base for status in statuses):
                    return statuses
                await trio.sleep(0.05)


async def test_a_pruned_network_verifies_from_its_checkpoint_and_says_history_is_pruned(pruning_network: LocalNetwork) -> None:
    network = pruning_network
    with trio.fail_after(DEADLINE_S):
        await wait_until_connected(network)
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            receipts = [await client.put(f"key-{index}", str(index)) for index in range(PUTS)]
            assert all(receipt.result.ok for receipt in receipts)
            tip = await wait_for_agreement(client, minimum_height=receipts[-1].height)
            first = receipts[0]
        statuses = await wait_for_pruning(network, minimum_base=first.height + 1)
        for status in statuses:
            # At least the last retain_blocks blocks, and never above the stable checkpoint.
            assert status.base_height <= min(status.stable_checkpoint, status.height - RETAIN_BLOCKS + 1), statuses

        shown = await run_client_cli(network, "status")
        assert shown.exit_code == 0 and "kept from" in shown.stdout, shown.describe()

        audit = await run_client_cli(network, "verify", "--from-checkpoint", "--replica", "1")
        assert audit.exit_code == 0, audit.describe()
        assert "verified from its stable checkpoint at height" in audit.stdout, audit.describe()
        assert "signed its height, block hash and state digest" in audit.stdout, audit.describe()
        as_json = await run_client_cli(network, "--json", "verify", "--from-checkpoint")
        assert as_json.exit_code == 0, as_json.describe()
        report = as_json.json()
        assert report["valid"] and report["from_height"] >= CHECKPOINT_INTERVAL and len(report["checkpoint_signers"]) >= 3
        assert report["height"] >= tip.height

        full = await run_client_cli(network, "verify", "--replica", "2")
        assert full.exit_code == 1, full.describe()
        assert "history is pruned" in full.stderr and "--from-checkpoint" in full.stderr, full.describe()
        assert "Traceback" not in full.stderr + full.stdout, full.describe()

        block = await run_client_cli(network, "block", str(first.height))
        assert block.exit_code == 1 and f"block {first.height}: " in block.stderr, block.describe()
        assert "pruned: this replica keeps blocks from height" in block.stderr, block.describe()
        assert "Traceback" not in block.stderr, block.describe()
        transaction = await run_client_cli(network, "tx", first.transaction_id.hex())
        assert transaction.exit_code == 1 and f"transaction {first.transaction_id.hex()}: " in transaction.stderr, transaction.describe()
        assert "pruned:" in transaction.stderr and "Traceback" not in transaction.stderr, transaction.describe()

        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            with pytest.raises(HistoryPruned):
                await client.fetch_blocks(0, 1)
            assert await client.get(f"key-{PUTS - 1}") == str(PUTS - 1)  # the state is whole

        # Pruned stores restart, and `check` audits each from its base and says so.
        assert await network.stop() == 0, network.diagnostics()
        check = await run_command([*NODE_COMMAND, "check", str(network.directory)])
        assert check.exit_code == 0, check.describe()
        assert check.stdout.count("OK, checked from block") == 4, check.describe()
        await network.start()
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            after = await client.put("after-restart", "pruned")
            assert after.result.ok and after.height > tip.height
            await wait_for_agreement(client, minimum_height=after.height)
