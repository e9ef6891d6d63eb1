"""The long run's pieces (node/bench.py): signing on the fly once the pre-signed supply is used,
and the memory verdict over the second half. No timing here."""

from __future__ import annotations

import itertools

from ledger.crypto import NetworkIdentity, PublicKeyCache, SigningKey
from ledger.transactions import transaction_domain
from node.bench import Account, account_transactions, bench_transactions, memory_verdict

MIB = 2**20


def test_an_account_signs_on_the_fly_after_its_presigned_transactions_with_the_next_nonces() -> None:
    network = NetworkIdentity("bench-test", bytes(32))
    key = SigningKey.generate()
    account = Account(key, bench_transactions(network, key, 3))
    told: list[None] = []
    transactions = list(itertools.islice(account_transactions(network, account, lambda: told.append(None)), 7))
    assert [transaction.nonce for transaction in transactions] == list(range(7))
    assert transactions[:3] == account.presigned
    assert len(told) == 4, "each transaction past the pre-signed ones is counted as signed on the fly"
    keys, domain = PublicKeyCache(), transaction_domain(network)
    for transaction in transactions:
        assert keys.verify(transaction.sender, domain, transaction.signed_bytes(), transaction.signature)


def _samples(*rows: tuple[float, list[int]]) -> list[dict[str, object]]:
    return [{"at_s": at_s, "rss_bytes": [size * MIB for size in sizes]} for at_s, sizes in rows]


def test_memory_that_grows_only_while_caches_fill_is_flat() -> None:
    verdict = memory_verdict(_samples((0.0, [50, 50]), (100.0, [70, 71]), (150.0, [72, 72]), (300.0, [73, 73])))
    assert verdict["memory_flat"] is True
    assert verdict["second_half_from_s"] == 150.0
    assert verdict["rss_second_half_growth_bytes"] == [1 * MIB, 1 * MIB]


def test_memory_that_keeps_growing_in_the_second_half_of_one_replica_is_not_flat() -> None:
    verdict = memory_verdict(_samples((0.0, [50, 50]), (150.0, [70, 70]), (300.0, [71, 80])))
    assert verdict["memory_flat"] is False
    assert verdict["rss_second_half_growth_bytes"] == [1 * MIB, 10 * MIB]
