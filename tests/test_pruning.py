"""Block pruning (retain_blocks): what a pruned store keeps, restarts from, refuses to read, and how `check` audits it."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import chain_helpers
import pytest
from chain_helpers import extend_executed_chain, make_network, sign_certificate

import ledger.storage
from client.quorum import QueryQuorum
from ledger.application import AccountsApplication
from ledger.blocks import Block, BlockHeader, results_root
from ledger.merkle import merkle_root
from ledger.messages import PRUNED, Query, pruned_from_height, pruned_reason
from ledger.restore import audit_store
from ledger.storage import BlockStore, StoreError
from ledger.transactions import Transaction
from node.core import LOG_KINDS
from node.queries import answer_query

NETWORK = make_network("pruning-net")
RETAIN = 15
CHECKPOINT_INTERVAL = 20
BLOCKS_PER_WRITE = 5


def open_replica_store(path: Path, retain_blocks: int | None = RETAIN) -> tuple[BlockStore, AccountsApplication, int]:
    return chain_helpers.open_replica_store(path, NETWORK, retain_blocks)


def grow(store: BlockStore, application: AccountsApplication, count: int, stable_lag: int = 0) -> list[Block]:
    """Commit `count` executed blocks a few per round, as a running replica does: a round that
    reaches a checkpoint interval carries the prune of the stable checkpoint `stable_lag` below it."""
    written: list[Block] = []
    while count > 0:
        blocks = extend_executed_chain(NETWORK, application, store.last_hash, store.height, min(count, BLOCKS_PER_WRITE), 2)
        tip = blocks[-1].height
        stable = (tip // CHECKPOINT_INTERVAL) * CHECKPOINT_INTERVAL - stable_lag
        crossed = tip // CHECKPOINT_INTERVAL > store.height // CHECKPOINT_INTERVAL
        prune = (stable, 0, LOG_KINDS) if crossed and stable > 0 else None
        store.write_round([], blocks, prune, application.take_changes())
        written += blocks
        count -= len(blocks)
    return written


def stored_heights(path: Path) -> list[int]:
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("select height from blocks order by height")]
    finally:
        connection.close()


def indexed_heights(path: Path) -> set[int]:
    connection = sqlite3.connect(path)
    try:
        return {row[0] for row in connection.execute("select height from transactions")}
    finally:
        connection.close()


def test_a_pruned_store_keeps_exactly_the_promised_blocks_across_checkpoints_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path)
    chain: list[Block] = []
    for _ in range(6):  # 120 blocks: six stable checkpoints
        chain += grow(store, application, CHECKPOINT_INTERVAL)
        stable = (store.height // CHECKPOINT_INTERVAL) * CHECKPOINT_INTERVAL
        expected_base = min(stable, store.height - RETAIN + 1)
        assert store.base_height == expected_base
        assert stored_heights(path) == list(range(expected_base, store.height + 1))
        assert min(indexed_heights(path)) >= expected_base
        assert store.get_meta("base_height") == expected_base
    assert store.height == 120 and store.base_height == 106
    for height in range(106, 121):
        assert store.block(height) == chain[height - 1]
    assert store.block(105) is None
    for transaction in chain[50].transactions:
        assert store.locate_transaction(transaction.transaction_id) is None  # its index row went with its block
    for position, transaction in enumerate(chain[110].transactions):
        assert store.locate_transaction(transaction.transaction_id) == (111, position)
    store.close()

    store, restarted, replayed = open_replica_store(path)
    assert (store.base_height, store.height, replayed) == (106, 120, 0)
    assert restarted.state_digest() == chain[-1].header.state_digest
    store.verify(recent_max=None)
    report = audit_store(store, NETWORK.config)
    assert (report.base_height, report.blocks, report.state_height, report.blocks_re_executed) == (106, 15, 120, 0)
    # The restarted store goes on pruning once the next checkpoint is stable.
    grow(store, restarted, CHECKPOINT_INTERVAL)
    assert (store.height, store.base_height) == (140, 126)
    store.close()


def test_the_stable_checkpoint_block_is_never_pruned(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path, retain_blocks=1)
    # Checkpoints become stable late: the newest stable one is 30 blocks below each interval.
    grow(store, application, 100, stable_lag=30)
    assert store.height == 100
    assert store.base_height == 70  # retain_blocks alone would allow 100
    assert store.block(70) is not None and store.block(69) is None
    # A prune naming an older checkpoint does not move the kept stable block down, nor delete it.
    store.prune_messages(40, 0, LOG_KINDS)
    assert store.base_height == 70 and store.block(70) is not None
    store.close()


def test_an_archive_store_never_prunes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path, retain_blocks=None)
    grow(store, application, 60)
    assert store.base_height == 0 and stored_heights(path) == list(range(1, 61))
    store.close()


def test_pruning_deletes_a_bounded_number_of_blocks_per_round_and_the_rest_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path, retain_blocks=None)
    grow(store, application, 40)
    store.close()
    # Switched to retain_blocks = 2 after 40 archived blocks, with a bound of 8 blocks a round.
    monkeypatch.setattr(ledger.storage, "PRUNE_BLOCKS_PER_ROUND_MIN", 8)
    store, application, _ = open_replica_store(path, retain_blocks=2)
    assert store.base_height == 0  # no stable checkpoint named since the start: nothing pruned
    store.prune_messages(40, 0, LOG_KINDS)
    assert store.base_height == 9 and stored_heights(path)[0] == 9
    store.prune_messages(40, 0, LOG_KINDS)
    assert store.base_height == 17
    # Block rounds go on with the backlog (towards the stable checkpoint 40 it was told of).
    blocks = extend_executed_chain(NETWORK, application, store.last_hash, store.height, 1, 2)
    store.write_round([], blocks, None, application.take_changes())
    assert store.base_height == 25
    store.close()
    store, _, replayed = open_replica_store(path, retain_blocks=2)
    assert (store.base_height, store.height, replayed) == (25, 41, 0)
    store.close()


def test_pruning_never_passes_the_stored_state(tmp_path: Path) -> None:
    """Blocks written without their state leave the state behind: a restart replays from it, so
    its block must stay."""
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path, retain_blocks=1)
    grow(store, application, 20)
    assert store.base_height == 20
    blocks = extend_executed_chain(NETWORK, application, store.last_hash, store.height, 20, 2)
    store.write_round([], blocks, (40, 0, LOG_KINDS), None)
    assert store.state_height == 20 and store.base_height == 20
    store.close()
    store, restarted, replayed = open_replica_store(path, retain_blocks=1)
    assert replayed == 20 and restarted.state_digest() == blocks[-1].header.state_digest
    store.close()


def block_with(application: AccountsApplication, parent: Block, transactions: list[Transaction]) -> Block:
    results = tuple(application.execute_block(transactions))
    header = BlockHeader(
        height=parent.height + 1,
        view=0,
        proposer=0,
        parent_hash=parent.block_hash,
        transactions_root=merkle_root([transaction.transaction_id for transaction in transactions]),
        results_root=results_root(results),
        state_digest=application.state_digest(),
        timestamp_ms=1_700_000_000_000 + parent.height + 1,
    )
    return Block(header, tuple(transactions), results, sign_certificate(NETWORK, header))


def pruned_store_with_a_replay(path: Path) -> None:
    """40 blocks, retain_blocks 25, checkpoints every 20: blocks 16..40 kept. Block 21 replays a
    transaction of block 10: final but not indexed, its index row was block 10's, now pruned."""
    store, application, _ = open_replica_store(path, retain_blocks=25)
    chain = grow(store, application, 20)
    replay = block_with(application, chain[-1], [chain[9].transactions[0]])
    assert not replay.results[0].ok
    store.write_round([], [replay], None, application.take_changes())
    grow(store, application, 19)
    assert (store.base_height, store.height) == (16, 40)
    assert store.locate_transaction(chain[9].transactions[0].transaction_id) is None
    store.close()


def test_check_audits_a_pruned_store_from_its_base(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    pruned_store_with_a_replay(path)
    store = BlockStore.open(path, NETWORK.genesis, verify=False)
    report = audit_store(store, NETWORK.config)
    assert (report.base_height, report.blocks, report.state_height) == (16, 25, 40)
    store.close()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("update state_accounts set balance = balance + 1 where account = (select min(account) from state_accounts)", "does not match its digest"),
        ("update blocks set data = (select data from blocks where height = 30) where height = 20", "store fails verification"),
        ("delete from blocks where height = 25", "blocks are missing"),
        ("delete from transactions where height = 30", "does not locate"),
    ],
)
def test_check_on_a_pruned_store_finds_damage_in_what_it_keeps(tmp_path: Path, statement: str, problem: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    pruned_store_with_a_replay(path)
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(statement)
    connection.close()
    store = BlockStore.open(path, NETWORK.genesis, verify=False)
    with pytest.raises(StoreError, match=problem):
        audit_store(store, NETWORK.config)
    store.close()


def test_a_read_below_the_base_gets_the_pruned_refusal(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path)
    chain = grow(store, application, 40)
    assert store.first_height == 26
    kept_from = store.first_height

    def ask(kind: str, argument: object) -> tuple[object, str]:
        query = Query(1, kind, argument, 0, bytes(16))
        reply = answer_query(query, 0, application, store.height, store, None, kept_from)
        return reply.result, reply.error

    assert ask("block-hash", 3) == (None, "pruned: this replica keeps blocks from height 26")
    assert ask("block-hash", 30) == (chain[29].block_hash, "")
    old = chain[2].transactions[0].transaction_id
    result, error = ask("transaction", old)
    assert result is None and error.startswith(PRUNED) and pruned_from_height(error) == 26
    assert ask("transaction", chain[30].transactions[1].transaction_id) == ([31, 1], "")
    # An archive answers as before: no block, no error.
    assert answer_query(Query(1, "block-hash", 3, 0, bytes(16)), 0, application, 40, store, None).error == ""
    store.close()


def test_pruned_refusals_from_replicas_keeping_different_heights_make_one_answer() -> None:
    query = Query(7, "block-hash", 3, 0, bytes(16))
    quorum = QueryQuorum(NETWORK.config, query, NETWORK.config.reply_quorum)
    answer = None
    for replica_id, kept_from in ((1, 26), (2, 31)):
        reply = answer_query(query, replica_id, AccountsApplication({}), 50, EmptyLedger(), None, kept_from)
        signature = NETWORK.replica_signing_keys[replica_id].sign(quorum.domain, reply.signed_bytes())
        answer = quorum.add(dataclasses.replace(reply, signature=signature))
    assert answer is not None and answer.error.startswith(PRUNED)


class EmptyLedger:
    height = 50

    def locate_transaction(self, transaction_id: bytes) -> tuple[int, int] | None:
        return None

    def block_hash(self, height: int) -> bytes | None:
        return None

    def transactions_with_prefix(self, prefix: str, limit: int) -> list[tuple[bytes, int, int]]:
        return []


def test_pruned_reason_round_trips_its_height() -> None:
    assert pruned_from_height(pruned_reason(123)) == 123
    assert pruned_from_height(pruned_reason(9, "detail")) == 9
    assert pruned_from_height("pruned: no height here") is None
    assert pruned_from_height("behind: height 3") is None


def test_a_store_refuses_a_retain_blocks_that_is_not_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        BlockStore.open(tmp_path / "ledger.sqlite3", NETWORK.genesis, retain_blocks=0).close()


def test_reopening_without_retain_blocks_keeps_the_base(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path)
    grow(store, application, 40)
    store.close()
    store, _, _ = open_replica_store(path, retain_blocks=None)
    assert store.base_height == 26
    with pytest.raises(StoreError):
        store.install_snapshot(store.block(30), None, b"")  # type: ignore[arg-type]
    store.close()


def test_a_peer_fetching_below_the_base_is_served_what_is_kept(tmp_path: Path) -> None:
    """A peer is answered from the base on (its core takes nothing that does not link, and state
    sync needs the stable checkpoint's block); only a client is told "pruned"."""
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path)
    chain = grow(store, application, 40)
    served = [Block.decode(data) for data in store.encoded_blocks(1, 4, 1 << 20)]
    assert [block.height for block in served] == [26, 27, 28, 29] and served[0] == chain[25]
    store.close()


def test_health_and_metrics_show_the_base_of_a_pruned_replica() -> None:
    from node.metrics import ReplicaSnapshot, health_of

    archive = ReplicaSnapshot(0, True, 40, 0, True, 3, 2, 3, {}, 0, 0, 0, 0, 0, 0)
    assert "base_height" not in health_of(archive).body
    pruned = dataclasses.replace(archive, base_height=26)
    assert health_of(pruned).body["base_height"] == 26 and health_of(pruned).healthy


def test_pruning_a_round_stops_at_a_bounded_number_of_transactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path, retain_blocks=None)
    grow(store, application, 40)  # 2 transactions a block
    store.close()
    monkeypatch.setattr(ledger.storage, "PRUNE_TRANSACTIONS_PER_ROUND_MIN", 5)
    store, _, _ = open_replica_store(path, retain_blocks=2)
    store.prune_messages(40, 0, LOG_KINDS)
    assert store.base_height == 4  # blocks 1 to 3: 6 transactions, the first past the bound of 5
    assert min(indexed_heights(path)) == 4
    store.close()
