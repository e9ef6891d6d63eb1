"""A new replica with an empty store joins a live network by state sync, then takes part in commits."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from client.library import open_client
from ledger.storage import BlockStore

from .local_network import fetch_chain
from .replica_processes import Load, ReplicaProcesses

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0
STATE_SYNC_DISTANCE = 16  # one checkpoint interval of the fast template


async def test_a_new_replica_joins_a_live_network_by_state_sync_and_then_commits(tmp_path: Path) -> None:
    replicas = ReplicaProcesses(tmp_path / "net", 4, extra_protocol=f"state_sync_distance = {STATE_SYNC_DISTANCE}\n")
    await replicas.initialise()
    newcomer = 3
    try:
        with trio.fail_after(DEADLINE_S):
            for replica_id in range(3):
                await replicas.start(replica_id)
            async with open_client(replicas.client_config_path) as client:
                await client.wait_until_ready(replicas.network.quorum, deadline_s=30)
                interval = replicas.network.protocol.checkpoint_interval
                # Three replicas, a quorum, commit well past several checkpoints without the newcomer.
                last = None
                for index in range(4 * interval):
                    last = await client.put(f"before-{index}", str(index))
                assert last is not None
                stable = min(status.stable_checkpoint for status in await client.status() if status.reachable)
                assert stable > STATE_SYNC_DISTANCE

                # The newcomer starts with no store at all, while writers keep the network busy.
                load = Load(client, writers=4)
                async with trio.open_nursery() as nursery:
                    await nursery.start(load.run, 200)
                    await load.wait_for(20)
                    await replicas.start(newcomer)
                    while "state sync: installed the snapshot" not in replicas.log_path(newcomer).read_text():
                        await trio.sleep(0.05)
                    await load.wait_for(200)
                log = replicas.log_path(newcomer).read_text()
                assert "0 blocks re-executed" in log  # it opened an empty store
                assert "stored the snapshot at height" in log

                # With replica 0 (the primary) killed, a quorum of 3 needs the newcomer's votes.
                await replicas.kill(0)
                after = [await client.put(f"after-{index}", str(index)) for index in range(5)]
                assert all(receipt.result.ok for receipt in after)
                while True:
                    living = [status for status in await client.status() if status.replica_id != 0]
                    tips = {(status.height, status.last_block_hash) for status in living}
                    if len(tips) == 1 and all(status.reachable and status.height >= after[-1].height for status in living):
                        break
                    await trio.sleep(0.05)
                assert all(status.view >= 1 for status in living)
                heights = {replica_id: len(await fetch_chain(client, replica_id)) for replica_id in (1, 2)}
                assert heights == {1: living[0].height, 2: living[0].height}
    finally:
        await replicas.stop_all()
    # The newcomer's store starts at the snapshot, and every block it holds is the others'.
    stores = {
        replica_id: BlockStore.open(replicas.directory / "data" / f"replica-{replica_id}" / "ledger.sqlite3", replicas.network.genesis_hash)
        for replica_id in (1, newcomer)
    }
    try:
        synced, honest = stores[newcomer], stores[1]
        assert synced.base_height > STATE_SYNC_DISTANCE
        assert synced.height > synced.base_height
        for height in range(synced.base_height, synced.height + 1):
            block = synced.block(height)
            assert block is not None and block.block_hash == honest.block(height).block_hash
        assert synced.block(synced.base_height - 1) is None
    finally:
        for store in stores.values():
            store.close()


async def test_a_pruned_replica_behind_what_its_peers_keep_catches_up_by_state_sync(tmp_path: Path) -> None:
    # Checkpoints every 4 blocks, every replica keeping 6: after 40 blocks without it, the blocks
    # replica 3 needs are gone everywhere. It is nowhere near state_sync_distance (256) behind,
    # but the peers answer its block fetch from their base up: only a snapshot helps.
    replicas = ReplicaProcesses(tmp_path / "net", 4)
    await replicas.initialise()
    for path in replicas.directory.glob("*.toml"):
        text = path.read_text().replace("checkpoint_interval = 16", "checkpoint_interval = 4")
        if path.name.startswith("replica-"):
            text = "[storage]\nretain_blocks = 6\n\n" + text
        path.write_text(text)
    behind = 3
    try:
        with trio.fail_after(DEADLINE_S):
            await replicas.start_all()
            async with open_client(replicas.client_config_path) as client:
                await client.wait_until_ready(replicas.network.quorum, deadline_s=30)
                while not all(status.reachable and status.connected_peers == 3 for status in await client.status(wait_s=1.0)):
                    await trio.sleep(0.05)
                for index in range(5):
                    await client.put(f"first-{index}", str(index))
                await replicas.kill(behind)
                last = None
                for index in range(40):
                    last = await client.put(f"later-{index}", str(index))
                assert last is not None
                statuses = {status.replica_id: status for status in await client.status() if status.reachable}
                assert min(status.base_height for status in statuses.values()) > 10  # the others pruned
                await replicas.start(behind)
                while True:
                    status = next(status for status in await client.status() if status.replica_id == behind)
                    if status.reachable and status.height >= last.height:
                        break
                    await trio.sleep(0.05)
        log = replicas.log_path(behind).read_text()
        assert "state sync: installed the snapshot" in log, replicas.diagnostics()
    finally:
        await replicas.stop_all()
