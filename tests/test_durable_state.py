"""The durable application state: a restart reads it instead of replaying history; damage is refused; old stores migrate; `ledger-node check` audits from genesis."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import chain_helpers
import pytest
from chain_helpers import extend_executed_chain, make_network, write_network_config

from ledger.application import AccountsApplication
from ledger.blocks import Block
from ledger.storage import SCHEMA_VERSION, BlockStore, StoreError

NETWORK = make_network("durable-net")
CHAIN_HEIGHT = 200  # far more than the 16 blocks an open checks, so a deep edit is left to `check`
BLOCKS_PER_WRITE = 7
LEDGER_NODE = Path(sys.executable).with_name("ledger-node")


def open_replica_store(path: Path) -> tuple[BlockStore, AccountsApplication, int]:
    return chain_helpers.open_replica_store(path, NETWORK)


def grow(store: BlockStore, application: AccountsApplication, count: int, with_state: bool = True, distinct_keys: bool = False) -> None:
    """Commit `count` executed blocks, a few per write, as a running replica does."""
    while count > 0:
        blocks = extend_executed_chain(
            NETWORK, application, store.last_hash, store.height, min(count, BLOCKS_PER_WRITE), 2, distinct_keys=distinct_keys
        )
        changes = application.take_changes()
        store.write_round([], blocks, None, changes if with_state else None)
        count -= len(blocks)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "ledger.sqlite3"
    store, application, replayed = open_replica_store(path)
    assert replayed == 0
    grow(store, application, CHAIN_HEIGHT, distinct_keys=True)
    store.close()
    return path


@pytest.fixture
def store_path(template_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data" / "replica-0" / "ledger.sqlite3"
    path.parent.mkdir(parents=True)
    shutil.copy(template_store, path)
    return path


def execute_sql(path: Path, statement: str, parameters: tuple[object, ...] = ()) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(statement, parameters)
    finally:
        connection.close()


def query_sql(path: Path, statement: str, parameters: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(statement, parameters).fetchall()
    finally:
        connection.close()


def test_restart_after_thousands_of_blocks_replays_only_what_is_after_the_durable_state(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application, _ = open_replica_store(path)
    grow(store, application, 2000)
    expected_digest = application.state_digest()
    store.close()

    store, restarted, replayed = open_replica_store(path)
    assert replayed == 0  # nothing after the durable state: no history re-executed
    assert restarted.state_digest() == expected_digest
    assert restarted.snapshot() == application.snapshot()
    # Blocks written without their state (a store from before the state was kept, in part):
    # a restart re-executes exactly those, and writes the state so the next one needs none.
    grow(store, restarted, 5, with_state=False)
    store.close()
    store, restarted, replayed = open_replica_store(path)
    assert (replayed, store.state_height, store.height) == (5, 2005, 2005)
    grow(store, restarted, 3)
    store.close()
    store, _, replayed = open_replica_store(path)
    store.close()
    assert replayed == 0


def test_the_state_is_read_from_the_tables_not_rebuilt(store_path: Path) -> None:
    """The rows are the state: keys written in history are there, and balances add up."""
    accounts = query_sql(store_path, "select balance from state_accounts")
    assert sum(balance for (balance,) in accounts) == NETWORK.client_balance
    keys = query_sql(store_path, "select count(*) from state_values")[0][0]
    assert keys == CHAIN_HEIGHT  # one distinct put per block
    store, application, replayed = open_replica_store(store_path)
    store.close()
    assert replayed == 0
    assert application.query("get", "key-0") == "v"


def edited_balance(path: Path) -> None:
    execute_sql(path, "update state_accounts set balance = balance + 1 where account = ?", (NETWORK.client_key.public_key,))


def edited_value(path: Path) -> None:
    execute_sql(path, "update state_values set value = 'forged' where key = 'key-0'")


def deleted_value(path: Path) -> None:
    execute_sql(path, "delete from state_values where key = 'key-0'")


def added_account(path: Path) -> None:
    execute_sql(path, "insert into state_accounts values (?, 5, 0)", (b"\x01" * 32,))


def edited_balance_and_digest(path: Path) -> None:
    """The state digest recomputed to match the edited rows: the tip's header still disagrees."""
    edited_balance(path)
    store = BlockStore.open(path, NETWORK.genesis)
    loaded = store.load_state()
    store.close()
    assert loaded is not None
    forged = AccountsApplication.from_entries(loaded[2], loaded[3]).state_digest()
    execute_sql(path, "update meta set value = ? where key = 'state_digest'", (forged,))


def malformed_row(path: Path) -> None:
    execute_sql(path, "update state_accounts set balance = 'lots'")


def undecodable_value(path: Path) -> None:
    """A value cell that is not UTF-8 (found by an adversarial review: a raw sqlite3 traceback at start)."""
    execute_sql(path, "update state_values set value = cast(x'ff' as text) where key = (select min(key) from state_values)")


def state_above_tip(path: Path) -> None:
    execute_sql(path, "update meta set value = ? where key = 'state_height'", (CHAIN_HEIGHT + 1,))


def deleted_old_block(path: Path) -> None:
    execute_sql(path, "delete from blocks where height = 10")


def edited_recent_block(path: Path) -> None:
    block = Block.decode(query_sql(path, "select data from blocks where height = ?", (CHAIN_HEIGHT - 3,))[0][0])
    edited = Block(block.header, block.transactions[:1], block.results[:1], block.certificate)
    execute_sql(path, "update blocks set data = ? where height = ?", (edited.encode(), CHAIN_HEIGHT - 3))


def uncertified_tip(path: Path) -> None:
    """The tip's header and contents untouched (its hash still matches), its certificate cut to one signature."""
    block = Block.decode(query_sql(path, "select data from blocks where height = ?", (CHAIN_HEIGHT,))[0][0])
    assert block.certificate is not None
    cut = type(block.certificate)(block.certificate.view, block.certificate.signatures[:1])
    execute_sql(path, "update blocks set data = ? where height = ?", (Block(block.header, block.transactions, block.results, cut).encode(), CHAIN_HEIGHT))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (edited_balance, "does not match its digest"),
        (edited_value, "does not match its digest"),
        (deleted_value, "does not match its digest"),
        (added_account, "does not match its digest"),
        (edited_balance_and_digest, f"is not the state of block {CHAIN_HEIGHT}"),
        (malformed_row, "malformed"),
        (undecodable_value, "unreadable"),
        (state_above_tip, "above the tip"),
        (deleted_old_block, "blocks are missing"),
        (edited_recent_block, "store fails verification"),
        (uncertified_tip, "valid commit signatures"),
    ],
)
def test_a_damaged_store_is_refused_at_start(store_path: Path, tamper: Callable[[Path], None], message: str) -> None:
    tamper(store_path)
    with pytest.raises(StoreError, match=message) as raised:
        open_replica_store(store_path)
    assert "\n" not in str(raised.value)


def make_old_layout(path: Path) -> None:
    """What a store written before the state was kept looks like: no state tables, schema 1."""
    for statement in (
        "drop table state_accounts",
        "drop table state_values",
        "delete from meta where key in ('state_height', 'state_digest', 'latest_timestamp_ms')",
        "update meta set value = 1 where key = 'schema'",
    ):
        execute_sql(path, statement)


def test_an_old_layout_store_is_migrated_and_replayed_once(store_path: Path) -> None:
    make_old_layout(store_path)
    store, application, replayed = open_replica_store(store_path)
    assert replayed == CHAIN_HEIGHT
    assert store.state_height == CHAIN_HEIGHT
    digest = application.state_digest()
    store.close()
    assert query_sql(store_path, "select value from meta where key = 'schema'") == [(SCHEMA_VERSION,)]
    store, application, replayed = open_replica_store(store_path)
    store.close()
    assert replayed == 0
    assert application.state_digest() == digest


def test_a_store_from_a_newer_version_is_refused(store_path: Path) -> None:
    execute_sql(store_path, "update meta set value = ? where key = 'schema'", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this program"):
        BlockStore.open(store_path, NETWORK.genesis)


def test_state_changes_are_refused_on_a_state_behind_the_tip(store_path: Path) -> None:
    """A change is relative to the stored state: added to a state that is behind, it would be wrong."""
    store, application, _ = open_replica_store(store_path)
    try:
        grow(store, application, 1, with_state=False)
        with pytest.raises(StoreError, match="before changes are added"):
            grow(store, application, 1)
        assert store.height == CHAIN_HEIGHT + 1  # the refused write stored nothing
    finally:
        store.close()


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LEDGER_NODE), "check", str(config)], capture_output=True, text=True, timeout=120)


def test_check_passes_a_sound_store_through_the_real_cli(store_path: Path) -> None:
    config = write_network_config(NETWORK, store_path.parent.parent.parent)
    result = run_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"replica 0: checked {CHAIN_HEIGHT}/{CHAIN_HEIGHT} blocks" in lines
    assert lines[-1].startswith(f"replica 0: OK: {CHAIN_HEIGHT} blocks, {2 * CHAIN_HEIGHT} transactions re-executed from genesis")


def edited_old_block(path: Path) -> None:
    """An edit deep in history, with its stored hash fixed up: past what an open checks."""
    block = Block.decode(query_sql(path, "select data from blocks where height = 5")[0][0])
    header = type(block.header)(**{**{name: getattr(block.header, name) for name in (
        "height", "view", "proposer", "parent_hash", "transactions_root", "results_root", "state_digest")}, "timestamp_ms": 1})
    edited = Block(header, block.transactions, block.results, block.certificate)
    execute_sql(path, "update blocks set data = ?, hash = ? where height = 5", (edited.encode(), header.block_hash))


def misplaced_index_row(path: Path) -> None:
    execute_sql(path, "update transactions set height = 3 where height = 100 and position = 0")


def deleted_index_row(path: Path) -> None:
    execute_sql(path, "delete from transactions where height = 50")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (misplaced_index_row, "the transaction index does not locate"),
        (deleted_index_row, "the transaction index does not locate"),
        (edited_old_block, "block 6: parent hash does not match block 5"),
        (edited_balance_and_digest, "differs from the state re-executed"),
        (deleted_old_block, "blocks are missing"),
    ],
)
def test_check_refuses_a_damaged_store_through_the_real_cli(store_path: Path, tamper: Callable[[Path], None], message: str) -> None:
    config = write_network_config(NETWORK, store_path.parent.parent.parent)
    tamper(store_path)
    result = run_check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    verdict = result.stdout.splitlines()[-1]
    assert verdict.startswith("replica 0: DAMAGED: ") and message in verdict, result.stdout


def test_an_old_edit_deep_in_history_is_left_to_check(store_path: Path) -> None:
    """What the bounded open does not see (and `check` does, above): an edit past the last 16 blocks (RECENT_BLOCKS_CHECKED)."""
    edited_old_block(store_path)
    store, _, replayed = open_replica_store(store_path)
    store.close()
    assert replayed == 0


def test_check_refuses_a_missing_store_and_a_replica_in_use(tmp_path: Path, store_path: Path) -> None:
    missing = write_network_config(NETWORK, tmp_path / "empty")
    result = run_check(missing)
    assert result.returncode == 1 and "MISSING: no store at" in result.stdout, result.stdout
    config = write_network_config(NETWORK, store_path.parent.parent.parent)
    from ledger.storage import DataDirectoryLock

    lock = DataDirectoryLock(store_path.parent)
    try:
        result = run_check(config)
    finally:
        lock.release()
    assert result.returncode == 1 and "NOT CHECKED" in result.stdout and "in use by" in result.stdout, result.stdout
