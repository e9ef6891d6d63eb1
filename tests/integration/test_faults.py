"""Surviving faults with real processes: a killed or stopped primary, restarted backups, repeated
crashes of f replicas, and flat memory over a long run."""

from __future__ import annotations

import random
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from client.library import Client

from .local_network import (
    CLIENT_COMMAND,
    NODE_COMMAND,
    CommandResult,
    fetch_chain,
    run_command,
    wait_for_agreement,
)
from .replica_processes import (
    Load,
    ReplicaProcesses,
    connected_client,
    replica_processes,
    resident_memory_bytes,
)

pytestmark = pytest.mark.integration

FAULT_DEADLINE_S = 120.0


async def assert_chains_hold(client: Client, replicas: ReplicaProcesses, acknowledged: list[bytes]) -> None:
    """Every replica serves the same chain, and it holds every acknowledged transaction."""
    status = await wait_for_agreement(client, deadline_s=60)
    # Up to the tip they agreed on: a request a backup still held may commit a block meanwhile.
    chains = [(await fetch_chain(client, replica_id))[: status.height] for replica_id in range(replicas.replica_count)]
    hashes = {tuple(block.block_hash for block in chain) for chain in chains}
    assert len(hashes) == 1, f"replicas serve different chains: heights {[len(chain) for chain in chains]}"
    assert len(chains[0]) == status.height
    in_chain = {transaction.transaction_id for block in chains[0] for transaction in block.transactions}
    lost = [transaction_id.hex() for transaction_id in acknowledged if transaction_id not in in_chain]
    assert not lost, f"acknowledged transactions missing from the chain: {lost[:5]}"


async def test_killing_the_primary_under_load_changes_view_and_loses_nothing(tmp_path: Path, replica_count: int) -> None:
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(FAULT_DEADLINE_S):
            load = Load(client, writers=8)
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run, 400)
                await load.wait_for(100)
                await replicas.kill(0)  # the primary of view 0
                acknowledged_before = len(load.receipts)
                await load.wait_for(acknowledged_before + 100)
            statuses = await client.status()
            live = [status for status in statuses if status.reachable]
            assert len(live) == replica_count - 1
            assert all(status.view >= 1 and status.primary != 0 for status in live), statuses
            assert any(receipt.view >= 1 for receipt in load.receipts)
            # The killed primary comes back and catches up; then every chain must match.
            await replicas.start(0)
            await assert_chains_hold(client, replicas, [receipt.transaction_id for receipt in load.receipts])


async def test_a_stopped_primary_is_replaced_and_follows_the_new_view(tmp_path: Path, replica_count: int) -> None:
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(FAULT_DEADLINE_S):
            await client.put("before", "stop")
            replicas.signal(0, signal.SIGSTOP)
            receipt = await client.put("during", "stop")  # longer than the view-change timeout
            assert receipt.view >= 1
            replicas.signal(0, signal.SIGCONT)
            final = await client.put("after", "continue")
            status = await wait_for_agreement(client, minimum_height=final.height, deadline_s=60)
            assert status.view >= 1
            # The old primary follows the new view (it learns it from its peers' status).
            while True:
                statuses = await client.status()
                if statuses[0].view == status.view and not statuses[0].view_changing:
                    break
                await trio.sleep(0.05)


async def test_a_restarted_backup_catches_up_by_state_transfer(tmp_path: Path, replica_count: int) -> None:
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(FAULT_DEADLINE_S):
            backup = replica_count - 1
            checkpoint_interval = replicas.network.protocol.checkpoint_interval
            await client.put("warm", "up")
            await replicas.kill(backup)
            # Sequential puts: one block each, 2K + 3 of them, so stable checkpoints move past the backup.
            last = None
            for index in range(2 * checkpoint_interval + 3):
                last = await client.put(f"key-{index}", str(index))
            assert last is not None
            statuses = await client.status()
            assert min(status.stable_checkpoint for status in statuses if status.reachable) >= checkpoint_interval
            await replicas.start(backup)
            await wait_for_agreement(client, minimum_height=last.height, deadline_s=60)
            chains = [await fetch_chain(client, replica_id) for replica_id in range(replica_count)]
            assert len({tuple(block.block_hash for block in chain) for chain in chains}) == 1
            assert "caught up" in replicas.log_path(backup).read_text()


async def test_f_replicas_crashing_twenty_times_lose_nothing(tmp_path: Path, replica_count: int) -> None:
    generator = random.Random(replica_count)
    faults = (replica_count - 1) // 3
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(4 * FAULT_DEADLINE_S):
            load = Load(client, writers=6)
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run, 6 * 2000)
                for _ in range(20):
                    victims = generator.sample(range(replica_count), faults)
                    await load.wait_for(len(load.receipts) + generator.randint(1, 15))
                    for victim in victims:
                        await replicas.kill(victim)
                    await load.wait_for(len(load.receipts) + generator.randint(1, 15))
                    for victim in victims:
                        await replicas.start(victim)
                nursery.cancel_scope.cancel()
            acknowledged = [receipt.transaction_id for receipt in load.receipts]
            await assert_chains_hold(client, replicas, acknowledged)
        for replica_id in range(replica_count):
            result = await run_verify(replicas, replica_id)
            assert result.exit_code == 0, result.describe()


async def run_verify(replicas: ReplicaProcesses, replica_id: int) -> CommandResult:
    return await run_command([*CLIENT_COMMAND, "-c", str(replicas.client_config_path), "verify", "--replica", str(replica_id)])


MEMORY_BOUND_BYTES = 128 * 1024 * 1024
# After warm-up the state stops growing (100 writers, one key each), so memory must stay flat.
MEMORY_GROWTH_AFTER_WARMUP_MAX_BYTES = 24 * 1024 * 1024
LONG_RUN_TRANSACTIONS = 20_000


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_memory_stays_bounded_over_twenty_thousand_transactions(tmp_path: Path, replica_count: int) -> None:
    """Every replica stays under MEMORY_BOUND_BYTES of resident memory for the whole run."""
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(600):
            load = Load(client, writers=100)
            peaks = dict.fromkeys(range(replica_count), 0)
            warm: dict[int, int] = {}
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run, LONG_RUN_TRANSACTIONS)
                for milestone in range(2_000, LONG_RUN_TRANSACTIONS + 1, 2_000):
                    await load.wait_for(milestone)
                    for replica_id in range(replica_count):
                        resident = resident_memory_bytes(replicas.pid(replica_id))
                        peaks[replica_id] = max(peaks[replica_id], resident)
                        if milestone >= 4_000:
                            warm.setdefault(replica_id, resident)
            assert len(load.receipts) == LONG_RUN_TRANSACTIONS
            print("peak resident memory per replica (MiB):", {r: round(peak / 2**20) for r, peak in peaks.items()})
            for replica_id, peak in peaks.items():
                assert peak < MEMORY_BOUND_BYTES, f"replica {replica_id} peaked at {peak / 2**20:.0f} MiB"
                growth = peak - warm[replica_id]
                assert growth < MEMORY_GROWTH_AFTER_WARMUP_MAX_BYTES, f"replica {replica_id} grew {growth / 2**20:.0f} MiB after warm-up"
            statuses = await client.status()
            assert all(status.stable_checkpoint > 0 for status in statuses)


def truncate_store(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)


def flip_a_byte_of_block(path: Path, height: int | None = None) -> int:
    """Flip one byte in the middle of a stored block (by default the one 2 below the tip); returns its height."""
    connection = sqlite3.connect(path)
    with connection:
        if height is None:
            height = connection.execute("select max(height) from blocks").fetchone()[0] - 2
        (data,) = connection.execute("select data from blocks where height = ?", (height,)).fetchone()
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        connection.execute("update blocks set data = ? where height = ?", (bytes(flipped), height))
    connection.close()
    assert height is not None
    return height


def tamper_with_a_block(path: Path) -> None:
    # A start checks the last RECENT_BLOCKS_CHECKED blocks (ledger/storage.py), so that its cost
    # does not grow with the history; damage deeper down is `ledger-node check`'s (test below).
    flip_a_byte_of_block(path)


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
@pytest.mark.parametrize("damage", [truncate_store, tamper_with_a_block], ids=["truncated", "tampered"])
async def test_a_damaged_store_is_detected_at_start(tmp_path: Path, replica_count: int, damage: Callable[[Path], None]) -> None:
    async with replica_processes(tmp_path / "net", replica_count) as replicas, connected_client(replicas) as client:
        with trio.fail_after(FAULT_DEADLINE_S):
            for index in range(40):
                await client.put(f"key-{index}", "value")
            await wait_for_agreement(client, minimum_height=40)
    store = tmp_path / "net" / "data" / "replica-1" / "ledger.sqlite3"
    damage(store)
    result = await run_command([*NODE_COMMAND, "run", str(tmp_path / "net" / "replica-1.toml")], 60)
    assert result.exit_code != 0, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ledger.sqlite3" in lines[0], result.describe()
    assert "Traceback" not in result.stderr


async def test_damage_deep_in_history_is_found_by_check(tmp_path: Path) -> None:
    """A byte flipped in block 2 of 40, past what a start checks: `ledger-node check` re-reads everything and says where."""
    async with replica_processes(tmp_path / "net", 4) as replicas, connected_client(replicas) as client:
        with trio.fail_after(FAULT_DEADLINE_S):
            for index in range(40):
                await client.put(f"key-{index}", "value")
            await wait_for_agreement(client, minimum_height=40)
    store = tmp_path / "net" / "data" / "replica-1" / "ledger.sqlite3"
    sound = await run_command([*NODE_COMMAND, "check", str(tmp_path / "net" / "replica-1.toml")], 120)
    assert sound.exit_code == 0 and sound.stdout.splitlines()[-1].startswith("replica 1: OK: "), sound.describe()
    flip_a_byte_of_block(store, 2)
    result = await run_command([*NODE_COMMAND, "check", str(tmp_path / "net"), "--replica", "1"], 120)
    verdict = result.stdout.splitlines()[-1]
    assert result.exit_code == 1 and verdict.startswith("replica 1: DAMAGED: ") and "block 2" in verdict, result.describe()
