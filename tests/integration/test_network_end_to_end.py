"""`ledger-node up`, 200 transactions from the library and a few from the CLI, identical verified chains."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from client.library import Client, open_client
from client.quorum import Receipt
from ledger.crypto import SigningKey, write_key_file

from .local_network import LocalNetwork, fetch_chain, run_client_cli, wait_for_agreement

pytestmark = pytest.mark.integration

GENESIS_BALANCE = 1_000_000
FUNDING_AMOUNT = 10_000
FIRST_ACCOUNT_OPERATIONS = 100
SECOND_ACCOUNT_OPERATIONS = 99
CLI_TRANSFER_AMOUNT = 25
WORKLOAD_DEADLINE_S = 120.0


def make_account_key(directory: Path, name: str) -> Path:
    path = directory / f"{name}.key"
    write_key_file(path, SigningKey.generate())
    return path


async def run_account_workload(
    client: Client, counterpart: bytes, operations: int, prefix: str, receipts: list[Receipt], sent: list[int]
) -> None:
    """Alternate transfers to `counterpart` and puts, one at a time, as one account."""
    for index in range(operations):
        if index % 2 == 0:
            amount = 1 + index % 7
            receipt = await client.transfer(counterpart, amount)
            sent.append(amount)
        else:
            receipt = await client.put(f"{prefix}-{index}", f"value {index} from {prefix}")
        assert receipt.result.ok, f"{prefix} operation {index} failed: {receipt.result.reason}"
        receipts.append(receipt)


async def test_transactions_from_library_and_cli_give_identical_verified_chains(
    network: LocalNetwork, client: Client
) -> None:
    first_account = client.key.public_key if client.key is not None else b""
    second_key_path = make_account_key(network.directory, "second")
    receipts: list[Receipt] = []
    sent_by_first: list[int] = []
    sent_by_second: list[int] = []

    with trio.fail_after(WORKLOAD_DEADLINE_S):
        async with open_client(network.client_config_path, second_key_path) as second_client:
            second_account = second_client.key.public_key if second_client.key is not None else b""
            funding = await client.transfer(second_account, FUNDING_AMOUNT)
            assert funding.result.ok, funding
            receipts.append(funding)
            # Two accounts submitting side by side, each sequentially: 1 + 100 + 99 = 200 transactions.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_account_workload, client, second_account, FIRST_ACCOUNT_OPERATIONS, "first", receipts, sent_by_first)
                nursery.start_soon(run_account_workload, second_client, first_account, SECOND_ACCOUNT_OPERATIONS, "second", receipts, sent_by_second)
    assert len(receipts) == 200
    assert len({receipt.transaction_id for receipt in receipts}) == 200
    for receipt in receipts:
        assert len(set(receipt.replicas)) >= network.network.reply_quorum

    # A few through the command line, acting as the first account.
    put = await run_client_cli(network, "put", "cli-greeting", "hello from the cli")
    assert put.exit_code == 0, put.describe()
    assert "put 'cli-greeting': committed" in put.stdout, put.describe()
    transfer = await run_client_cli(network, "--json", "transfer", second_account.hex(), str(CLI_TRANSFER_AMOUNT))
    assert transfer.exit_code == 0, transfer.describe()
    transfer_receipt = transfer.json()
    assert transfer_receipt["ok"] is True, transfer.describe()
    assert len(transfer_receipt["confirmed_by"]) >= network.network.reply_quorum
    get = await run_client_cli(network, "get", "cli-greeting")
    assert get.exit_code == 0, get.describe()
    assert "cli-greeting = hello from the cli" in get.stdout, get.describe()

    tip = await wait_for_agreement(client, minimum_height=transfer_receipt["height"])

    chains = [await fetch_chain(client, replica_id) for replica_id in range(network.replica_count)]
    hashes = [[block.block_hash for block in chain] for chain in chains]
    for replica_id, replica_hashes in enumerate(hashes):
        assert replica_hashes == hashes[0], f"replica {replica_id}'s chain differs from replica 0's"
    assert len(hashes[0]) == tip.height
    assert hashes[0][-1] == tip.last_block_hash
    chain = chains[0]
    for parent, block in zip(chain, chain[1:], strict=False):
        assert block.header.parent_hash == parent.block_hash

    # Every receipt points at its transaction in the agreed chain, and nothing executed twice.
    for receipt in receipts:
        block = chain[receipt.height - 1]
        assert block.block_hash == receipt.block_hash
        assert block.transactions[receipt.index].transaction_id == receipt.transaction_id
        assert block.results[receipt.index].ok
    executed = [transaction.transaction_id for block in chain for transaction in block.transactions]
    assert len(executed) == len(set(executed)) == 202
    assert bytes.fromhex(transfer_receipt["transaction_id"]) in executed

    # Balances and nonces add up: 1 funding + 50 transfers + 50 puts + 2 CLI for the first account.
    first_balance, first_nonce = await client.account(first_account)
    second_balance, second_nonce = await client.account(second_account)
    moved_to_second = FUNDING_AMOUNT + sum(sent_by_first) + CLI_TRANSFER_AMOUNT
    assert first_balance == GENESIS_BALANCE - moved_to_second + sum(sent_by_second)
    assert second_balance == moved_to_second - sum(sent_by_second)
    assert first_nonce == 1 + FIRST_ACCOUNT_OPERATIONS + 2
    assert second_nonce == SECOND_ACCOUNT_OPERATIONS
    assert await client.get(f"first-{FIRST_ACCOUNT_OPERATIONS - 1}") == f"value {FIRST_ACCOUNT_OPERATIONS - 1} from first"
    assert await client.get(f"second-{SECOND_ACCOUNT_OPERATIONS - 2}") == f"value {SECOND_ACCOUNT_OPERATIONS - 2} from second"

    for replica_id in range(network.replica_count):
        verify = await run_client_cli(network, "verify", "--replica", str(replica_id))
        assert verify.exit_code == 0, verify.describe()
        assert f"chain of replica {replica_id} verified: {tip.height} blocks, 202 transactions" in verify.stdout, verify.describe()


READ_YOUR_WRITES_ROUNDS = 20


async def test_reads_right_after_confirmed_writes_see_them_from_library_and_cli(network: LocalNetwork, client: Client) -> None:
    # The library: each get asks from the height of the put just confirmed, so it sees that put,
    # however far behind the replicas outside the receipt's f + 1 are.
    with trio.fail_after(WORKLOAD_DEADLINE_S):
        for round_number in range(READ_YOUR_WRITES_ROUNDS):
            receipt = await client.put("read-your-writes", f"round {round_number}")
            assert receipt.result.ok, receipt
            assert client.read_floor >= receipt.height
            assert await client.get("read-your-writes") == f"round {round_number}"
            # Its own account's nonce counts every put so far (no one else signs for this account).
            assert (await client.account())[1] == round_number + 1

    # The command line, a new process per command: the height a put printed carries the write over.
    put = await run_client_cli(network, "--json", "put", "cli-read-your-writes", "written")
    assert put.exit_code == 0, put.describe()
    height = put.json()["height"]
    get = await run_client_cli(network, "--json", "--min-height", str(height), "get", "cli-read-your-writes")
    assert get.exit_code == 0, get.describe()
    assert get.json()["value"] == "written" and get.json()["height"] >= height, get.describe()

    # A floor no replica has reached: the read gives up naming it, instead of answering from older state.
    unreachable = await run_client_cli(network, "--timeout", "2", "--min-height", str(height + 10_000), "get", "cli-read-your-writes")
    assert unreachable.exit_code == 3, unreachable.describe()
    assert f"at height {height + 10_000} or above" in unreachable.stderr, unreachable.describe()
