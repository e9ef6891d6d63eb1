"""A resubmitted transaction is answered from the ledger: it never executes twice."""

from __future__ import annotations

import pytest
import trio

from client.library import Client
from client.quorum import Receipt
from ledger.crypto import SigningKey
from ledger.transactions import Transfer

from .local_network import LocalNetwork, fetch_chain, wait_for_agreement

pytestmark = pytest.mark.integration

AMOUNT = 7
DEADLINE_S = 60.0


def placement(receipt: Receipt) -> tuple[object, ...]:
    """What must not change between receipts of one transaction."""
    return (receipt.transaction_id, receipt.result, receipt.height, receipt.index, receipt.block_hash)


async def test_resubmitted_transaction_executes_once(network: LocalNetwork, client: Client) -> None:
    assert client.key is not None
    sender = client.key.public_key
    recipient = SigningKey.generate().public_key
    with trio.fail_after(DEADLINE_S):
        sender_balance, sender_nonce = await client.account(sender)
        recipient_balance, _ = await client.account(recipient)

        transaction = await client.sign(Transfer(recipient, AMOUNT))
        first = await client.submit(transaction)
        assert first.result.ok, first
        second = await client.submit(transaction)
        assert placement(second) == placement(first)

        # Still the same answer after the ledger moved on past it.
        later = await client.put("after-the-resubmission", "yes")
        assert later.result.ok and later.height > first.height
        third = await client.submit(transaction)
        assert placement(third) == placement(first)

        assert await client.account(sender) == (sender_balance - AMOUNT, sender_nonce + 2)
        assert await client.account(recipient) == (recipient_balance + AMOUNT, 0)

        await wait_for_agreement(client, minimum_height=later.height)
        for replica_id in range(network.replica_count):
            chain = await fetch_chain(client, replica_id)
            occurrences = [
                (block.height, index)
                for block in chain
                for index, included in enumerate(block.transactions)
                if included.transaction_id == transaction.transaction_id
            ]
            assert occurrences == [(first.height, first.index)], f"replica {replica_id}: {occurrences}"


CONCURRENT_DEADLINE_S = 5.0


async def test_concurrent_resubmission_gets_the_same_receipt(network: LocalNetwork, client: Client) -> None:
    transaction = await client.sign(Transfer(SigningKey.generate().public_key, AMOUNT))
    receipts: list[Receipt] = []
    errors: list[BaseException] = []

    async def submit() -> None:
        try:
            receipts.append(await client.submit(transaction, deadline_s=CONCURRENT_DEADLINE_S))
        except Exception as error:  # recorded: the assertion below says what went wrong
            errors.append(error)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            nursery.start_soon(submit)
    assert not errors, f"a concurrent resubmission raised {errors!r}"
    assert len(receipts) == 2 and placement(receipts[0]) == placement(receipts[1])
