"""SIGTERM leaves every replica's store consistent, and `ledger-node up` again continues the same chain."""

from __future__ import annotations

import dataclasses
import sqlite3
import time

import pytest
import trio

from client.library import Client, ClientError, open_client
from client.quorum import Receipt
from ledger.crypto import SigningKey, read_key_file, signing_domain, write_key_file
from ledger.messages import Batch, PrePrepare, encode_message
from ledger.transactions import Put, Transfer, sign_transaction

from .local_network import (
    NODE_COMMAND,
    LocalNetwork,
    fetch_chain,
    run_client_cli,
    run_command,
    wait_for_agreement,
)

pytestmark = pytest.mark.integration

TRANSACTIONS_BEFORE_STOP = 20
RECEIPTS_UNDER_LOAD = 10
TRANSFER_AMOUNT = 3
RECOVERY_DEADLINE_S = 15.0
DEADLINE_S = 90.0


async def stop_cleanly(network: LocalNetwork) -> None:
    assert network.run is not None
    run = network.run
    exit_code = await network.stop()
    assert exit_code == 0, network.diagnostics()
    assert "all replicas stopped" in run.output, network.diagnostics()
    assert not run.leaked_processes
    for replica_id in range(network.replica_count):
        assert f"replica {replica_id} stopped at height" in network.log_text(replica_id), network.diagnostics()


def stored_chains(network: LocalNetwork) -> list[list[bytes]]:
    """Each replica's stored block hashes; BlockStore.open verifies each store as it opens it."""
    return [network.stored_block_hashes(replica_id) for replica_id in range(network.replica_count)]


def assert_prefixes_agree(chains: list[list[bytes]]) -> None:
    longest = max(chains, key=len)
    for replica_id, chain in enumerate(chains):
        assert chain == longest[: len(chain)], f"replica {replica_id}'s stored chain is not a prefix of the longest"


async def verify_every_replica(network: LocalNetwork, height: int) -> None:
    for replica_id in range(network.replica_count):
        verify = await run_client_cli(network, "verify", "--replica", str(replica_id))
        assert verify.exit_code == 0, verify.describe()
        assert f"chain of replica {replica_id} verified: {height} blocks" in verify.stdout, verify.describe()


async def test_stop_and_restart_continue_the_chain(network: LocalNetwork) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            receipts = [await client.put(f"before-{index}", str(index)) for index in range(TRANSACTIONS_BEFORE_STOP)]
            assert all(receipt.result.ok for receipt in receipts)
            recipient = SigningKey.generate().public_key
            old_transaction = await client.sign(Transfer(recipient, TRANSFER_AMOUNT))
            old_receipt = await client.submit(old_transaction)
            assert old_receipt.result.ok
            tip = await wait_for_agreement(client, minimum_height=old_receipt.height)

        await stop_cleanly(network)
        chains = stored_chains(network)
        assert all(len(chain) == tip.height for chain in chains), [len(chain) for chain in chains]
        assert all(chain == chains[0] for chain in chains)
        assert chains[0][-1] == tip.last_block_hash

        await network.start()
        for replica_id in range(network.replica_count):
            # The restart read the durable state written with the blocks: no history re-executed.
            assert (
                f"store opened at height {tip.height} in" in network.log_text(replica_id)
                and f"durable state at height {tip.height}" in network.log_text(replica_id)
                and "; 0 blocks re-executed" in network.log_text(replica_id).split("store opened at height")[-1]
            ), network.diagnostics()
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            resumed = await wait_for_agreement(client)
            assert (resumed.height, resumed.last_block_hash) == (tip.height, tip.last_block_hash)
            assert await client.get(f"before-{TRANSACTIONS_BEFORE_STOP - 1}") == str(TRANSACTIONS_BEFORE_STOP - 1)

            # A transaction from before the restart is still answered from the ledger, not re-executed.
            again = await client.submit(old_transaction)
            assert (again.height, again.index, again.block_hash, again.result) == (
                old_receipt.height,
                old_receipt.index,
                old_receipt.block_hash,
                old_receipt.result,
            )
            assert await client.account(recipient) == (TRANSFER_AMOUNT, 0)

            after = await client.put("after-restart", "continued")
            assert after.result.ok
            assert after.height == tip.height + 1
            final = await wait_for_agreement(client, minimum_height=after.height)
            chain = await fetch_chain(client, 0)
            assert [block.block_hash for block in chain[: tip.height]] == chains[0]
            assert chain[tip.height].header.parent_hash == tip.last_block_hash
        await verify_every_replica(network, final.height)

        await stop_cleanly(network)
        assert stored_chains(network) == [[block.block_hash for block in chain]] * network.replica_count


async def submit_until_cancelled(client: Client, receipts: list[Receipt], enough: trio.Event) -> None:
    """Put after put until cancelled; sets `enough` once RECEIPTS_UNDER_LOAD have been confirmed."""
    index = 0
    while True:
        try:
            receipt = await client.put(f"load-{index}", str(index))
        except ClientError:
            continue  # the network went down under us: keep trying until cancelled
        receipts.append(receipt)
        if len(receipts) >= RECEIPTS_UNDER_LOAD:
            enough.set()
        index += 1


async def test_stop_under_load_leaves_consistent_stores_and_restart_resumes_them(network: LocalNetwork) -> None:
    with trio.fail_after(DEADLINE_S):
        receipts: list[Receipt] = []
        async with open_client(network.client_config_path) as client, trio.open_nursery() as nursery:
            await client.wait_until_ready()
            enough = trio.Event()
            nursery.start_soon(submit_until_cancelled, client, receipts, enough)
            await enough.wait()
            # SIGTERM while transactions are in flight.
            await stop_cleanly(network)
            nursery.cancel_scope.cancel()

        chains = stored_chains(network)
        assert_prefixes_agree(chains)
        longest = max(chains, key=len)
        # A receipt needs f + 1 replicas to have stored its block: it is in the agreed prefix.
        for receipt in receipts:
            assert longest[receipt.height - 1] == receipt.block_hash

        # Every replica resumes from its own store and serves the same chain, verifiably. (That the
        # network then commits again is left to the deterministic test below: a stop at the wrong
        # moment hits the bug it exposes.)
        await network.start()
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            for replica_id, chain in enumerate(chains):
                served = await fetch_chain(client, replica_id)
                assert len(served) >= len(chain)
                assert [block.block_hash for block in served[: len(longest)]] == longest[: len(served)]
        for replica_id in range(network.replica_count):
            verify = await run_client_cli(network, "verify", "--replica", str(replica_id))
            assert verify.exit_code == 0, verify.describe()
        await stop_cleanly(network)
        assert_prefixes_agree(stored_chains(network))


async def test_restart_after_the_primary_persisted_an_unsent_pre_prepare_commits_again(network: LocalNetwork) -> None:
    network_config = network.network
    with trio.fail_after(DEADLINE_S + RECOVERY_DEADLINE_S):
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            for index in range(3):
                assert (await client.put(f"before-{index}", str(index))).result.ok
            tip = await wait_for_agreement(client)
            _, nonce = await client.account()
        await stop_cleanly(network)

        # What the primary leaves on disk when it stops after persisting a PRE-PREPARE and before
        # sending it (the runtime persists, then sends): signed by it, for the next sequence.
        primary_key = read_key_file(network.replica_key_path(tip.primary))
        client_key = read_key_file(network.directory / "client.key")
        transaction = sign_transaction(network_config.identity, client_key, nonce, Put("in-flight-at-the-stop", "yes"))
        batch = Batch(tip.view, tip.primary, time.time_ns() // 1_000_000, (transaction,))
        unsigned = PrePrepare(tip.view, tip.height + 1, batch, tip.primary)
        signature = primary_key.sign(signing_domain(network_config.identity, "pre-prepare"), unsigned.signed_bytes())
        store = network.open_store(tip.primary)
        try:
            store.save_messages([("pre-prepare", tip.view, tip.height + 1, encode_message(dataclasses.replace(unsigned, signature=signature)))])
        finally:
            store.close()

        await network.start()
        key_path = network.directory / "fresh.key"
        write_key_file(key_path, SigningKey.generate())
        async with open_client(network.client_config_path, key_path) as client:
            await client.wait_until_ready()
            after = await client.submit(await client.sign(Put("after-restart", "continued")), deadline_s=RECOVERY_DEADLINE_S)
            assert after.result.ok
            assert after.height > tip.height
            final = await wait_for_agreement(client, minimum_height=after.height)
        await verify_every_replica(network, final.height)


async def test_a_replica_with_an_edited_state_row_refuses_to_start(network: LocalNetwork) -> None:
    """A real replica process, its store's state edited while it was stopped: one line, exit 2."""
    with trio.fail_after(DEADLINE_S):
        async with open_client(network.client_config_path) as client:
            await client.wait_until_ready()
            assert (await client.put("edited-later", "original")).result.ok
            await wait_for_agreement(client)
        await stop_cleanly(network)
    connection = sqlite3.connect(network.store_path(0), isolation_level=None)
    try:
        assert connection.execute("update state_values set value = 'forged' where key = 'edited-later'").rowcount == 1
    finally:
        connection.close()
    result = await run_command([*NODE_COMMAND, "run", str(network.replica_config_path(0))], DEADLINE_S)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.describe()
    assert "the stored state does not match its digest" in lines[0] and "ledger-node check" in lines[0], result.describe()
