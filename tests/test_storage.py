"""Tests of the SQLite block store: reading back, reopening, refusing, tamper detection, crash safety."""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from chain_helpers import build_chain, make_network, make_transactions

from ledger.blocks import Block, BlockHeader, ChainError, results_root, verify_certificate
from ledger.crypto import NetworkIdentity, SigningKey
from ledger.storage import BlockStore, StoreError
from node.core import LOG_KINDS

NETWORK = make_network("storage-net")
CHAIN = build_chain(NETWORK, 6, transactions_per_block=3)
WRITER = Path(__file__).with_name("store_writer.py")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "replica" / "ledger.sqlite"


def filled_store(path: Path) -> BlockStore:
    store = BlockStore.open(path, NETWORK.genesis)
    store.append(CHAIN[:2])
    store.append(CHAIN[2:])
    return store


def execute_sql(path: Path, statement: str, parameters: tuple[object, ...] = ()) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(statement, parameters)
    finally:
        connection.close()


def test_new_store_is_empty(store_path: Path) -> None:
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        assert store.height == 0
        assert store.last_hash == NETWORK.genesis
        assert store.block(1) is None
        assert store.blocks(1, 10) == []
        assert list(store.iterate_blocks()) == []
    finally:
        store.close()


def test_blocks_read_back_by_height_and_by_transaction_id(store_path: Path) -> None:
    store = filled_store(store_path)
    try:
        assert store.height == len(CHAIN)
        assert store.last_hash == CHAIN[-1].block_hash
        for block in CHAIN:
            assert store.block(block.height) == block
            for position, transaction in enumerate(block.transactions):
                assert store.locate_transaction(transaction.transaction_id) == (block.height, position)
        assert store.block(0) is None
        assert store.block(len(CHAIN) + 1) is None
        assert store.blocks(2, 3) == CHAIN[1:4]
        assert list(store.iterate_blocks(batch_size=4)) == CHAIN
        assert list(store.iterate_blocks(from_height=5, batch_size=1)) == CHAIN[4:]
        assert store.locate_transaction(b"\x00" * 32) is None
    finally:
        store.close()


def test_transactions_by_id_prefix_are_one_bounded_index_range(store_path: Path) -> None:
    store = filled_store(store_path)
    try:
        everything = sorted(
            (transaction.transaction_id, block.height, position)
            for block in CHAIN
            for position, transaction in enumerate(block.transactions)
        )
        wanted = everything[3]
        for length in (8, 9, 31, 64):  # odd lengths too: a prefix need not end on a byte
            assert store.transactions_with_prefix(wanted[0].hex()[:length], 5) == [wanted]
        assert store.transactions_with_prefix("", 4) == everything[:4]
        assert store.transactions_with_prefix("0" * 64, 4) == []
        plan = store._reader.execute(
            "explain query plan select transaction_id from transactions where transaction_id between ? and ? limit 3",
            (bytes(32), bytes(32)),
        ).fetchall()
        assert any("USING" in str(row) and "INDEX" in str(row) for row in plan), plan
    finally:
        store.close()


def test_reopening_keeps_everything_and_appending_continues(store_path: Path) -> None:
    store = BlockStore.open(store_path, NETWORK.genesis)
    store.append(CHAIN[:3])
    store.close()
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        assert store.height == 3
        assert store.last_hash == CHAIN[2].block_hash
        store.append(CHAIN[3:])
    finally:
        store.close()
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        assert list(store.iterate_blocks()) == CHAIN
        last = CHAIN[-1].transactions[-1]
        assert store.locate_transaction(last.transaction_id) == (len(CHAIN), len(CHAIN[-1].transactions) - 1)
    finally:
        store.close()


def test_append_refuses_blocks_that_do_not_extend_the_tip(store_path: Path) -> None:
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        store.append(CHAIN[:2])
        with pytest.raises(ChainError):
            store.append(CHAIN[3:4])  # skips height 3
        with pytest.raises(ChainError):
            store.append(CHAIN[1:2])  # height 2 again
        other_chain = build_chain(make_network("other-net"), 3)
        with pytest.raises(ChainError):
            store.append(other_chain[2:3])
        # A bad block after a good one: nothing of the batch is stored.
        bad = dataclasses.replace(CHAIN[3], transactions=CHAIN[3].transactions[1:], results=CHAIN[3].results[1:])
        with pytest.raises(ChainError):
            store.append([CHAIN[2], bad])
        assert store.height == 2
        assert store.block(3) is None
        assert store.locate_transaction(CHAIN[2].transactions[0].transaction_id) is None
        store.append([])
        assert store.height == 2
    finally:
        store.close()
    reopened = BlockStore.open(store_path, NETWORK.genesis)
    try:
        assert reopened.height == 2
    finally:
        reopened.close()


def test_a_store_for_another_genesis_is_refused(store_path: Path) -> None:
    filled_store(store_path).close()
    other = make_network("other-net")
    with pytest.raises(StoreError, match="different network"):
        BlockStore.open(store_path, other.genesis)
    with pytest.raises(StoreError, match="different network"):
        BlockStore.open(store_path, other.genesis, verify=False)


def test_a_file_that_is_not_a_store_is_refused(store_path: Path) -> None:
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    with pytest.raises(StoreError, match="not a readable ledger store"):
        BlockStore.open(store_path, NETWORK.genesis)


def garbage_blob(path: Path) -> None:
    execute_sql(path, "update blocks set data=? where height=3", (b"\x85garbage",))


def another_blocks_blob(path: Path) -> None:
    execute_sql(path, "update blocks set data=? where height=3", (CHAIN[4].encode(),))


def tampered_transaction_blob(path: Path) -> None:
    stranger = make_transactions(NETWORK, 999, 1)[0]
    block = CHAIN[2]
    tampered = dataclasses.replace(block, transactions=(stranger, *block.transactions[1:]))
    execute_sql(path, "update blocks set data=? where height=3", (tampered.encode(),))


def tampered_header_blob(path: Path) -> None:
    block = CHAIN[2]
    tampered = dataclasses.replace(block, header=dataclasses.replace(block.header, state_digest=b"\x07" * 32))
    execute_sql(path, "update blocks set data=? where height=3", (tampered.encode(),))


def tampered_tip_header_blob(path: Path) -> None:
    block = CHAIN[-1]
    tampered = dataclasses.replace(block, header=dataclasses.replace(block.header, timestamp_ms=1))
    execute_sql(path, "update blocks set data=? where height=?", (tampered.encode(), block.height))


def flipped_byte_in_blob(path: Path) -> None:
    data = bytearray(CHAIN[1].encode())
    data[len(data) // 3] ^= 0x01
    execute_sql(path, "update blocks set data=? where height=2", (bytes(data),))


def tampered_hash_column(path: Path) -> None:
    execute_sql(path, "update blocks set hash=? where height=4", (b"\x00" * 32,))


def deleted_middle_block(path: Path) -> None:
    execute_sql(path, "delete from blocks where height=3")


def deleted_first_block(path: Path) -> None:
    execute_sql(path, "delete from blocks where height=1")


@pytest.mark.parametrize(
    "tamper",
    [
        garbage_blob,
        another_blocks_blob,
        tampered_transaction_blob,
        tampered_header_blob,
        tampered_tip_header_blob,
        flipped_byte_in_blob,
        tampered_hash_column,
        deleted_middle_block,
        deleted_first_block,
    ],
)
def test_a_tampered_store_is_detected_on_open(store_path: Path, tamper: Callable[[Path], None]) -> None:
    filled_store(store_path).close()
    tamper(store_path)
    with pytest.raises(StoreError, match="store fails verification|blocks are missing"):
        BlockStore.open(store_path, NETWORK.genesis)


def test_verify_can_be_skipped_on_open_and_run_later(store_path: Path) -> None:
    filled_store(store_path).close()
    garbage_blob(store_path)
    store = BlockStore.open(store_path, NETWORK.genesis, verify=False)
    try:
        assert store.height == len(CHAIN)
        with pytest.raises(StoreError):
            store.verify()
    finally:
        store.close()


def test_signed_messages_and_meta(store_path: Path) -> None:
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        store.save_messages([("prepare", 0, 2, b"p2"), ("commit", 0, 1, b"c1"), ("commit", 1, 1, b"c1v1")])
        store.save_messages([("prepare", 0, 2, b"p2 again")])
        store.save_messages([])
        assert store.load_messages() == [("commit", 0, 1, b"c1"), ("commit", 1, 1, b"c1v1"), ("prepare", 0, 2, b"p2 again")]
        store.save_messages(
            [
                ("stable-checkpoint", 0, 1, b"cp1"),
                ("stable-checkpoint", 0, 2, b"cp2"),
                ("view-change", 1, 0, b"vc1"),
                ("new-view", 2, 0, b"nv2"),
            ]
        )
        store.prune_messages(1, 2, LOG_KINDS)
        # Log kinds at or below the checkpoint go, older certificates and views go; the rest stays.
        assert store.load_messages() == [
            ("new-view", 2, 0, b"nv2"),
            ("stable-checkpoint", 0, 1, b"cp1"),
            ("prepare", 0, 2, b"p2 again"),
            ("stable-checkpoint", 0, 2, b"cp2"),
        ]
        store.prune_messages(2, 2, LOG_KINDS)
        assert store.load_messages() == [("new-view", 2, 0, b"nv2"), ("stable-checkpoint", 0, 2, b"cp2")]
        store.save_messages([("prepare", 0, 3, b"p2 again")])
        assert store.get_meta("view") is None
        store.set_meta("view", b"\x03")
        store.set_meta("view", b"\x04")
    finally:
        store.close()
    store = BlockStore.open(store_path, NETWORK.genesis)
    try:
        assert store.get_meta("view") == b"\x04"
        assert store.load_messages()[-1] == ("prepare", 0, 3, b"p2 again")
    finally:
        store.close()


# ---- crash safety: a writer killed with SIGKILL at several moments ----


@dataclasses.dataclass
class WriterProgress:
    opened_at: int = -1
    appended: int = 0  # the last height the writer reported as stored
    appending: int = 0  # the last height the writer announced it was about to store


async def run_writer_until_killed(path: Path, network_id: str, kill_on: str, count: int) -> WriterProgress:
    """Start the writer and SIGKILL it as soon as it has printed `count` lines starting with `kill_on`.

    Killing on "appending" lands while an append is under way (SQLite is writing and syncing);
    killing on "appended" lands between appends.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, str(WRITER), str(path), network_id],
        stdout=subprocess.PIPE,
        cwd=WRITER.parent,
    )
    assert process.stdout is not None
    progress = WriterProgress()
    seen = 0
    buffered = b""
    try:
        with trio.fail_after(60):
            while seen < count:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"writer exited early with status {await process.wait()}")
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    word, height_text = line.decode().split()
                    height = int(height_text)
                    if word == "opened":
                        progress.opened_at = height
                    elif word == "appending":
                        progress.appending = height
                    else:
                        assert word == "appended", line
                        progress.appended = height
                    seen += word == kill_on
                    if seen == count:
                        process.send_signal(signal.SIGKILL)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL
    return progress


def check_recovered_store(path: Path, network_id: str) -> int:
    """Everything stored is whole: contiguous, verified, certified and indexed. Returns the height."""
    network = make_network(network_id)
    store = BlockStore.open(path, network.genesis)  # runs verify()
    try:
        blocks = list(store.iterate_blocks())
        assert [block.height for block in blocks] == list(range(1, store.height + 1))
        transaction_count = 0
        for block in blocks:
            verify_certificate(block.header, block.certificate, network.identity, network.replica_keys, network.quorum)
            assert len(block.transactions) == 4
            for position, transaction in enumerate(block.transactions):
                assert store.locate_transaction(transaction.transaction_id) == (block.height, position)
            transaction_count += len(block.transactions)
        height = store.height
    finally:
        store.close()
    assert count_indexed_transactions(path) == transaction_count, "index rows without their block"
    return height


def count_indexed_transactions(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("select count(*) from transactions").fetchone()[0]
    finally:
        connection.close()


async def test_killed_writer_leaves_only_whole_blocks(tmp_path: Path) -> None:
    network_id = "crash-net"
    path = tmp_path / "crash" / "ledger.sqlite"
    recovered = 0
    # Each round restarts the writer on the same store and kills it at a different moment.
    for kill_on, count in (("appending", 1), ("appended", 4), ("appending", 3), ("appending", 8), ("appended", 1), ("appending", 5)):
        progress = await run_writer_until_killed(path, network_id, kill_on, count)
        assert progress.opened_at == recovered, "the writer did not find what the last round left"
        height = check_recovered_store(path, network_id)
        assert height >= progress.appended, "a block the writer reported as appended is missing"
        recovered = height
    assert recovered >= 20


def test_a_deferred_appearance_is_not_where_a_transaction_is_found(tmp_path: Path) -> None:
    """Hole 2: a transaction ordered ahead of its sender's earlier nonce is deferred (no outcome);
    the index must point at the block where it later executed, so a retransmission is answered
    with the final result, never the deferred one."""
    from ledger.application import AccountsApplication
    from ledger.messages import Batch
    from ledger.transactions import Put, sign_transaction

    network_id = "deferred-index"
    client = SigningKey.from_private_bytes(bytes(32))
    identity = NetworkIdentity(network_id, bytes(32))
    first = sign_transaction(identity, client, 0, Put("key", "first"))
    second = sign_transaction(identity, client, 1, Put("key", "second"))
    application = AccountsApplication({})
    genesis = b"\\x00" * 32
    blocks, parent = [], genesis
    for height, transactions in enumerate([(second,), (first,), (second,)], start=1):
        batch = Batch(0, 0, height, transactions)
        results = application.execute_block(list(transactions))
        header = BlockHeader(height, 0, 0, parent, batch.transactions_root, results_root(results), application.state_digest(), height)
        blocks.append(Block(header, transactions, tuple(results), None))
        parent = header.block_hash
    store = BlockStore.open(tmp_path / "store.sqlite3", genesis)
    store.append(blocks)
    assert not blocks[0].results[0].ok and blocks[2].results[0].ok
    assert store.locate_transaction(second.transaction_id) == (3, 0)
    assert store.locate_transaction(first.transaction_id) == (2, 0)
