"""The replica's durable store on SQLite (WAL): blocks, a transaction index, the application state, and its own signed messages.

Every write is one SQLite transaction, so a crash leaves either all of a block (with its index
entries and the state it produced) or none of it. synchronous=FULL makes a write durable before
the call returns, which is what lets a replica send a signed message only after it is on disk.

The application state (accounts, key-value entries) lives in two tables beside the blocks, with
the height it describes in meta: a restart reads the state instead of re-executing the history
(ledger/restore.py checks it against the stored chain).

A store may start from a snapshot instead of genesis (install_snapshot): then it holds the
certified block of the snapshot's height (its base, meta base_height) and the blocks after it,
none before. A store with `retain_blocks` prunes itself to the same shape: it moves its base up,
never past the stable checkpoint's block, and deletes the blocks (and their transaction-index
rows) below it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from ledger.application import StateChanges, is_final
from ledger.blocks import Block, ChainError, verify_block_contents, verify_chain_segment
from ledger.encoding import CodecError
from ledger.evidence import Evidence

# 1: blocks, index, signed messages, evidence. 2: the application state beside them (state_accounts,
# state_values; meta state_height, state_digest, latest_timestamp_ms). A version-1 store is
# migrated on open: the tables are added, empty, and the state counts as not yet written, so the
# first start replays the chain once and writes it.
SCHEMA_VERSION = 2
_SCHEMA = """
create table if not exists meta (key text primary key, value blob not null);
create table if not exists blocks (height integer primary key, hash blob not null, data blob not null);
-- Narrow (about 45 bytes a block): what the open-time gap count reads instead of the blocks themselves.
create index if not exists blocks_by_hash on blocks (hash);
create table if not exists transactions (
    transaction_id blob primary key, height integer not null, position integer not null);
create table if not exists signed_messages (
    kind text not null, view integer not null, sequence integer not null, data blob not null,
    primary key (kind, view, sequence));
create table if not exists evidence (
    id integer primary key autoincrement, replica_id integer not null, kind text not null,
    view integer not null, sequence integer not null, data blob not null,
    unique (replica_id, kind, view, sequence));
create table if not exists state_accounts (
    account blob primary key, balance integer not null, nonce integer not null) without rowid;
create table if not exists state_values (key text primary key, value text not null) without rowid;
"""

# The blocks a normal open checks (links, stored hashes, contents), counted back from the tip: a
# bounded cost whatever the chain's length. `ledger-node check` checks them all.
RECENT_BLOCKS_CHECKED = 16

# Evidence of other replicas' equivocation kept at most, in all; each replica's share is
# EVIDENCE_MAX // replica_count, so one traitor flooding cannot push out the evidence against others.
EVIDENCE_MAX = 1000


# What one write round deletes at most when pruning, however far behind the pruning is (the rest
# goes in later rounds): this many blocks and transaction-index rows, or twice what the round itself
# writes if that is more, so pruning keeps pace with any commit rate at most doubling a round's
# work. Each block deleted is read and decoded once for its transaction ids (about 1.1 ms for a
# block of 100 transactions; deleting its 100 index rows about as much again).
PRUNE_BLOCKS_PER_ROUND_MIN = 64
PRUNE_TRANSACTIONS_PER_ROUND_MIN = 1024


def evidence_per_replica_max(replica_count: int) -> int:
    return max(1, EVIDENCE_MAX // replica_count)


class StoreError(RuntimeError):
    """The store cannot be opened or its contents fail verification; the message says why."""


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a store written by a newer version: its layout may hold what this one would lose."""
    has_meta = connection.execute("select 1 from sqlite_master where type='table' and name='meta'").fetchone()
    if has_meta is None:
        return
    row = connection.execute("select value from meta where key='schema'").fetchone()
    if row is not None and (not isinstance(row[0], int) or row[0] > SCHEMA_VERSION):
        raise StoreError(f"{path}: store layout version {row[0]!r} is newer than this program's ({SCHEMA_VERSION}): upgrade ledger-node")


LOCK_FILE_NAME = "replica.lock"


class DirectoryInUse(StoreError):
    """Another process holds a replica's data directory; the message names it."""


def _holder(lock_path: Path) -> str:
    try:
        words = lock_path.read_text()[:64].split()
    except (OSError, UnicodeDecodeError):
        return "another process"
    return f"process {words[0]}" if words and words[0].isdigit() else "another process"


class DataDirectoryLock:
    """An exclusive lock on one replica's data directory (flock on DIR/replica.lock), held for
    the life of the process: two processes never open the same store. The file names the holder's pid."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / LOCK_FILE_NAME
            self._descriptor: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(f"{directory}: cannot create the data directory's lock: {error.strerror}") from None
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._descriptor)
            self._descriptor = None
            raise DirectoryInUse(f"{directory}: in use by {_holder(self.path)} (it holds {self.path}); stop it first") from None
        os.ftruncate(self._descriptor, 0)
        os.write(self._descriptor, f"{os.getpid()}\n".encode())

    @staticmethod
    def holder_if_locked(directory: Path) -> str | None:
        """Who holds the directory's lock right now ("process 1234"), or None if nobody does."""
        path = directory / LOCK_FILE_NAME
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(path)
        finally:
            os.close(descriptor)  # also releases a lock just taken
        return None

    def mark_ready(self) -> None:
        """Add "ready" after the pid: the holder listens on its addresses (what `up` waits for)."""
        if self._descriptor is not None:
            os.pwrite(self._descriptor, f"{os.getpid()} ready\n".encode(), 0)

    @staticmethod
    def ready_holder(directory: Path) -> int | None:
        """The pid the lock file names as holding the directory and listening, if any."""
        try:
            words = (directory / LOCK_FILE_NAME).read_text()[:64].split()
        except (OSError, UnicodeDecodeError):
            return None
        return int(words[0]) if len(words) == 2 and words[0].isdigit() and words[1] == "ready" else None

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


class BlockStore:
    """One replica's blocks and protocol records. Not thread-safe: one owner at a time."""

    def __init__(self, connection: sqlite3.Connection, path: Path, genesis: bytes, retain_blocks: int | None = None) -> None:
        # Two connections: the writer may commit from a worker thread (so an fsync never stalls
        # the event loop) while reads go on through the reader; WAL lets them run side by side.
        self._connection = connection
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.path = path
        self.genesis = genesis
        # (height, last hash) replaced in one store, so that a reader on another thread never
        # pairs a height with another block's hash (found by review of the status reply).
        self._tip: tuple[int, bytes | None] = self._read_tip()
        self._state_height = self._read_state_height()
        self._base_height = self._read_base_height()
        if retain_blocks is not None and retain_blocks < 1:
            raise ValueError(f"retain_blocks must be a positive number of blocks, not {retain_blocks}")
        self.retain_blocks = retain_blocks  # None: an archive, every block kept
        # The oldest checkpoint whose snapshot the replica serves (set by the runtime): its block
        # is kept too, since a joiner fetching that snapshot then fetches its block.
        self.snapshot_floor: int | None = None
        # The newest stable checkpoint a write round named (prune): no block from it up is ever
        # deleted. 0 until the first one after opening, so a restart prunes nothing before it.
        self._stable_sequence = 0

    @classmethod
    def open(cls, path: Path, genesis: bytes, verify: bool = True, retain_blocks: int | None = None) -> BlockStore:
        """Open (creating if new) the store for the chain whose block 1 has parent `genesis`.
        With `retain_blocks`, write rounds prune the blocks older than that (see write_round)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.execute("pragma journal_mode=wal")
            connection.execute("pragma synchronous=full")
            _check_schema(connection, path)
            connection.executescript(_SCHEMA)
            stored_genesis = connection.execute("select value from meta where key='genesis'").fetchone()
            if stored_genesis is None:
                with connection:
                    connection.execute("insert into meta values ('genesis', ?)", (genesis,))
                    connection.execute("insert or replace into meta values ('schema', ?)", (SCHEMA_VERSION,))
            elif stored_genesis[0] != genesis:
                raise StoreError(f"{path}: this store belongs to a different network (genesis differs)")
            else:
                with connection:  # a version-1 store: its new tables were just created, empty
                    connection.execute("insert or replace into meta values ('schema', ?)", (SCHEMA_VERSION,))
            store = cls(connection, path, genesis, retain_blocks)
            if verify:
                store.verify()
        except sqlite3.DatabaseError as error:
            if connection is not None:
                connection.close()
            raise StoreError(f"{path}: not a readable ledger store: {error}") from None
        except StoreError:
            if connection is not None:
                connection.close()
            raise
        return store

    def size_bytes(self) -> int:
        """Bytes the store takes on disk: the database file plus its write-ahead log, if any."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass  # no WAL between a checkpoint and the next write
        return total

    def close(self) -> None:
        self._reader.close()
        self._connection.close()

    def _read_tip(self) -> tuple[int, bytes | None]:
        row = self._reader.execute("select height, hash from blocks order by height desc limit 1").fetchone()
        return (0, None) if row is None else (row[0], row[1])

    def _read_state_height(self) -> int | None:
        row = self._reader.execute("select value from meta where key='state_height'").fetchone()
        if row is None:
            return None
        if not isinstance(row[0], int) or row[0] < 0:
            raise StoreError(f"{self.path}: the stored state height {row[0]!r} is not a height")
        return row[0]

    def _read_base_height(self) -> int:
        row = self._reader.execute("select value from meta where key='base_height'").fetchone()
        if row is None:
            return 0
        if not isinstance(row[0], int) or row[0] < 1:
            raise StoreError(f"{self.path}: the stored base height {row[0]!r} is not a height")
        return row[0]

    @property
    def _height(self) -> int:
        return self._tip[0]

    @property
    def height(self) -> int:
        return self._tip[0]

    @property
    def base_height(self) -> int:
        """The first block held: 0 for a store from genesis (block 1 on), else the height of
        the snapshot it was installed from, or the one pruning moved it to (that block on)."""
        return self._base_height

    @property
    def may_install_snapshot(self) -> bool:
        """Whether a snapshot may replace what is stored: an empty store, one that starts from a
        snapshot or pruning already, or one told to prune; never an archive's blocks from genesis."""
        return not self._height or self._base_height > 0 or self.retain_blocks is not None

    @property
    def first_height(self) -> int:
        return max(1, self._base_height)

    @property
    def state_height(self) -> int | None:
        """The height the stored application state describes, or None if no state was written
        (a new store, or one from before the state was kept)."""
        return self._state_height

    @property
    def last_hash(self) -> bytes:
        return self.tip[1]

    @property
    def tip(self) -> tuple[int, bytes]:
        """(height, last_hash) as one pair: from another thread than the one writing, reading
        height and then last_hash can straddle a write."""
        height, last_hash = self._tip
        return height, last_hash if last_hash is not None else self.genesis

    def verify(self, recent_max: int | None = RECENT_BLOCKS_CHECKED, batch_size: int = 256) -> None:
        """Check no block is missing, and that the last `recent_max` blocks (all of them with
        None) link to the one before and match their own headers and stored hashes.

        The gap check counts the entries of a narrow index over the blocks: linear in the number
        of blocks, but about 90 entries a page and no block read (see `make scale` for its cost)."""
        count = self._reader.execute("select count(*) from blocks").fetchone()[0]
        base = self._base_height
        if base and self._height < base:
            raise StoreError(f"{self.path}: the store starts at block {base} from a snapshot, but that block is missing")
        if count != (self._height - base + 1 if base else self._height):
            raise StoreError(f"{self.path}: {count} blocks stored but the highest is {self._height}: blocks are missing")
        first = self.first_height if recent_max is None else max(self.first_height, self._height - recent_max + 1)
        if base and first == base:
            # Nothing below the base is kept: its link down was checked (with its certificate) when installed.
            row = self._reader.execute("select data from blocks where height=?", (base,)).fetchone()
            try:
                parent_hash, parent_height = Block.decode(row[0]).header.parent_hash, base - 1
            except CodecError as error:
                raise StoreError(f"{self.path}: store fails verification: block {base}: cannot be decoded: {error}") from None
        elif first == 1:
            parent_hash, parent_height = self.genesis, 0
        else:
            # The link into the checked part is the stored hash of the block before it; `check` verifies that one too.
            parent_hash, parent_height = bytes(self._reader.execute(
                "select hash from blocks where height=?", (first - 1,)
            ).fetchone()[0]), first - 1
        try:
            while parent_height < self._height:
                rows = self._reader.execute(
                    "select height, hash, data from blocks where height>? order by height limit ?", (parent_height, batch_size)
                ).fetchall()
                blocks = []
                for height, stored_hash, data in rows:
                    try:
                        block = Block.decode(data)
                    except CodecError as error:
                        raise ChainError(f"block {height}: cannot be decoded: {error}") from None
                    if stored_hash != block.block_hash:
                        raise ChainError(f"block {height}: stored hash does not match its header")
                    blocks.append(block)
                verify_chain_segment(blocks, parent_hash, parent_height)
                parent_hash, parent_height = blocks[-1].block_hash, blocks[-1].height
        except ChainError as error:
            raise StoreError(f"{self.path}: store fails verification: {error}") from None

    def append(self, blocks: Iterable[Block]) -> None:
        """Append blocks that extend the tip, atomically: all of them are stored or none."""
        self.write_round([], blocks)

    def write_round(
        self,
        records: Iterable[tuple[str, int, int, bytes]],
        blocks: Iterable[Block],
        prune: tuple[int, int, Iterable[str]] | None = None,
        state: StateChanges | None = None,
    ) -> None:
        """One durable transaction for one round of a replica's work: its signed records, the
        blocks it committed, the application state those blocks produced (`state`: the entries
        they changed), and the pruning of records it no longer needs. All or nothing.

        Blocks written without `state` leave the stored state behind them (a restart replays
        the difference); `state` is a change to the stored state, so it is refused unless that
        state was at the tip before these blocks.

        `prune` (stable checkpoint sequence, view, log kinds) also names the newest stable
        checkpoint: with `retain_blocks`, this round and the later ones delete blocks below
        min(that checkpoint, tip - retain_blocks + 1, the stored state's height), a bounded
        number a round (see PRUNE_BLOCKS_PER_ROUND_MIN)."""
        records, blocks = list(records), list(blocks)
        if not records and not blocks and prune is None:
            return
        if blocks:
            verify_chain_segment(blocks, self.last_hash, self._height)
        if state is not None:
            if not blocks:
                raise ValueError("state changes without the blocks that made them: use write_state")
            if self._state_height != self._height:
                raise StoreError(
                    f"{self.path}: the stored state describes height {self._state_height}, not the tip {self._height}: "
                    "it must be brought to the tip (write_state) before changes are added to it"
                )
        with self._connection:
            self._connection.execute("begin")
            if records:
                self._connection.executemany("insert or replace into signed_messages values (?, ?, ?, ?)", records)
            for block in blocks:
                self._connection.execute(
                    "insert into blocks values (?, ?, ?)", (block.height, block.block_hash, block.encode())
                )
                # A transaction is found where its outcome became final: the first appearance
                # that was not deferred (a deferred one may still execute in a later block).
                self._connection.executemany(
                    "insert or ignore into transactions values (?, ?, ?)",
                    [
                        (transaction.transaction_id, block.height, index)
                        for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True))
                        if is_final(result)
                    ],
                )
            if state is not None:
                self._write_state(state, blocks[-1].height, blocks[-1].header.state_digest, blocks)
            if prune is not None:
                self._prune(*prune)
            stable_sequence = self._stable_sequence if prune is None else max(self._stable_sequence, prune[0])
            tip = blocks[-1].height if blocks else self._height
            state_height = tip if state is not None else self._state_height
            written_transactions = sum(len(block.transactions) for block in blocks)
            base_height = self._prune_blocks(
                stable_sequence,
                tip,
                state_height,
                max(PRUNE_BLOCKS_PER_ROUND_MIN, 2 * len(blocks)),
                max(PRUNE_TRANSACTIONS_PER_ROUND_MIN, 2 * written_transactions),
            )
        if blocks:
            self._tip = (blocks[-1].height, blocks[-1].block_hash)
        if state is not None:
            self._state_height = self._height
        self._stable_sequence, self._base_height = stable_sequence, base_height

    def prune_target(self, stable_sequence: int, tip: int, state_height: int | None) -> int:
        """The base pruning works towards: the last `retain_blocks` blocks are kept, and so is
        the stable checkpoint's block (a joining replica's state sync needs it: its hash is what
        2f+1 CHECKPOINTs sign) and the stored state's block (a restart replays from there).
        The current base when there is nothing to prune."""
        if self.retain_blocks is None or state_height is None or stable_sequence < 1:
            return self._base_height
        target = min(stable_sequence, tip - self.retain_blocks + 1, state_height)
        if self.snapshot_floor is not None:
            target = min(target, self.snapshot_floor)
        return target if target > self.first_height else self._base_height

    def _prune_blocks(self, stable_sequence: int, tip: int, state_height: int | None, blocks_max: int, transactions_max: int) -> int:
        """Inside a write round's transaction: delete the oldest blocks below the prune target
        with their index rows, at most `blocks_max` blocks and, past the first, `transactions_max`
        transactions; move meta base_height. The new base."""
        target = self.prune_target(stable_sequence, tip, state_height)
        first = self.first_height
        if target <= first:
            return self._base_height
        new_base, transactions = first, 0
        rows = self._connection.execute(
            "select height, data from blocks where height>=? and height<? order by height limit ?", (first, target, blocks_max)
        )
        try:
            for height, data in rows:
                if new_base > first and transactions >= transactions_max:
                    break
                ids = [(transaction.transaction_id, height + 1) for transaction in Block.decode(data).transactions]
                # An index row names a transaction's first final appearance: only rows at or
                # below this block go (a replay of it in a kept block was never indexed).
                self._connection.executemany("delete from transactions where transaction_id=? and height<?", ids)
                new_base, transactions = height + 1, transactions + len(ids)
        except CodecError:
            # A damaged old block must not stop the replica: find its rows by height instead (a scan).
            new_base = min(target, first + blocks_max)
            self._connection.execute("delete from transactions where height<?", (new_base,))
        finally:
            rows.close()
        if new_base == first:
            return self._base_height
        self._connection.execute("delete from blocks where height<?", (new_base,))
        self._connection.execute("insert or replace into meta values ('base_height', ?)", (new_base,))
        return new_base

    def install_snapshot(self, block: Block, changes: StateChanges, state_digest: bytes) -> None:
        """Start the store from a snapshot: `block` is the block of the snapshot's height (its
        certificate checked by the caller: ledger/restore.py, or the core's state sync) and
        `changes` every entry of the state after it. One transaction: the store then continues
        from that block. A store that starts from a snapshot, or prunes, gives up its blocks
        (it is no archive); one holding blocks from genesis without pruning refuses."""
        if not self.may_install_snapshot:
            raise StoreError(f"{self.path}: a snapshot is installed only in a store without blocks (this one holds {self._height})")
        if block.height <= self._height:
            raise StoreError(f"{self.path}: the snapshot at {block.height} is not above the stored height {self._height}")
        try:
            verify_block_contents(block)
        except ChainError as error:
            raise StoreError(f"{self.path}: the snapshot's block fails verification: {error}") from None
        if block.header.state_digest != state_digest:
            raise StoreError(f"{self.path}: the snapshot's state does not have the state digest of block {block.height}")
        with self._connection:
            self._connection.execute("begin")
            self._connection.execute("delete from state_accounts")
            self._connection.execute("delete from state_values")
            self._connection.execute("delete from blocks")
            self._connection.execute("delete from transactions")
            self._connection.execute("insert into blocks values (?, ?, ?)", (block.height, block.block_hash, block.encode()))
            self._connection.executemany(
                "insert or ignore into transactions values (?, ?, ?)",
                [
                    (transaction.transaction_id, block.height, index)
                    for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True))
                    if is_final(result)
                ],
            )
            self._write_state(changes, block.height, state_digest, [])
            # The latest stamp before the base is not known: the base's own (0 if it is a null
            # block) until later blocks raise it.
            self._connection.executemany(
                "insert or replace into meta values (?, ?)",
                [("base_height", block.height), ("latest_timestamp_ms", block.header.timestamp_ms)],
            )
        self._tip = (block.height, block.block_hash)
        self._state_height = self._base_height = block.height

    def write_state(self, changes: StateChanges, state_digest: bytes, latest_timestamp_ms: int) -> None:
        """Bring the stored state to the tip: `changes` are every entry changed since the stored
        state's height (all entries if there was none), `state_digest` the digest they produce,
        which must be the tip block's. One transaction; used once a start has replayed blocks."""
        if self._height:
            tip = self.block(self._height)
            assert tip is not None
            if tip.header.state_digest != state_digest:
                raise StoreError(f"{self.path}: the state to write does not have the state digest of block {self._height}")
        with self._connection:
            self._connection.execute("begin")
            self._write_state(changes, self._height, state_digest, [])
            self._connection.execute(
                "insert or replace into meta values ('latest_timestamp_ms', ?)", (latest_timestamp_ms,)
            )
        self._state_height = self._height

    def _write_state(self, changes: StateChanges, height: int, state_digest: bytes, blocks: list[Block]) -> None:
        self._connection.executemany("insert or replace into state_accounts values (?, ?, ?)", changes.accounts)
        self._connection.executemany("insert or replace into state_values values (?, ?)", changes.values)
        self._connection.executemany(
            "insert or replace into meta values (?, ?)", [("state_height", height), ("state_digest", state_digest)]
        )
        if blocks:
            # Null blocks carry timestamp 0, so the tip's own stamp is not the latest one.
            self._connection.execute(
                "update meta set value = max(value, ?) where key = 'latest_timestamp_ms'",
                (max(block.header.timestamp_ms for block in blocks),),
            )

    def load_state(self) -> tuple[int, bytes, list[tuple[bytes, int, int]], list[tuple[str, str]], int] | None:
        """The stored state: its height, digest, accounts and values, and the latest block
        timestamp up to its height; None if no state was written. Reads every entry once."""
        if self._state_height is None:
            return None
        digest = self.get_meta("state_digest")
        timestamp = self.get_meta("latest_timestamp_ms")
        if not isinstance(digest, bytes) or not isinstance(timestamp, int):
            raise StoreError(f"{self.path}: the stored state's digest or latest timestamp is missing or malformed")
        try:
            accounts = self._reader.execute("select account, balance, nonce from state_accounts order by account").fetchall()
            values = self._reader.execute("select key, value from state_values order by key").fetchall()
        except sqlite3.Error as error:
            # e.g. a text cell that is not UTF-8: the pages are sound (quick_check passes), the row is not.
            raise StoreError(f"{self.path}: a stored state entry is unreadable: {error}") from None
        return self._state_height, bytes(digest), accounts, values, timestamp

    def integrity_problem(self) -> str | None:
        """SQLite's own check of every page and index (linear in the file); None if it is sound."""
        rows = self._reader.execute("pragma quick_check").fetchall()
        return None if [tuple(row) for row in rows] == [("ok",)] else "; ".join(str(row[0]) for row in rows[:3])

    def transaction_index_count(self) -> int:
        return int(self._reader.execute("select count(*) from transactions").fetchone()[0])

    def block(self, height: int) -> Block | None:
        row = self._reader.execute("select data from blocks where height=?", (height,)).fetchone()
        return None if row is None else Block.decode(row[0])

    def block_hash(self, height: int) -> bytes | None:
        """The hash of a stored block, without decoding the block (verified against its header on open)."""
        if height > self._height:
            return None  # a row may be committed a moment before the tip moves: answer from the tip only
        row = self._reader.execute("select hash from blocks where height=?", (height,)).fetchone()
        return None if row is None else bytes(row[0])

    def blocks(self, from_height: int, count: int) -> list[Block]:
        rows = self._reader.execute(
            "select data from blocks where height>=? order by height limit ?", (from_height, count)
        ).fetchall()
        return [Block.decode(row[0]) for row in rows]

    def encoded_blocks(self, from_height: int, count: int, bytes_budget: int) -> list[bytes]:
        """Up to `count` blocks from `from_height` as stored (their canonical encoding), while their
        total stays within `bytes_budget`; the first is returned whatever its size. Rows are read
        one at a time, so blocks past the budget are never loaded."""
        encoded: list[bytes] = []
        total = 0
        rows = self._reader.execute("select data from blocks where height>=? order by height limit ?", (from_height, count))
        try:
            for (data,) in rows:
                total += len(data)
                if encoded and total > bytes_budget:
                    break
                encoded.append(bytes(data))
        finally:
            rows.close()
        return encoded

    def iterate_blocks(self, from_height: int = 1, batch_size: int = 256) -> Iterator[Block]:
        height = from_height
        while height <= self._height:
            batch = self.blocks(height, batch_size)
            if not batch:
                return
            yield from batch
            height = batch[-1].height + 1

    def locate_transaction(self, transaction_id: bytes) -> tuple[int, int] | None:
        row = self._reader.execute(
            "select height, position from transactions where transaction_id=?", (transaction_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def transactions_with_prefix(self, prefix: str, limit: int) -> list[tuple[bytes, int, int]]:
        """Up to `limit` (transaction id, height, position) whose id's hex starts with `prefix`
        (lowercase hex digits), in id order: one range scan of the primary-key index, however
        many transactions are stored."""
        low = bytes.fromhex(prefix.ljust(64, "0"))
        high = bytes.fromhex(prefix.ljust(64, "f"))
        rows = self._reader.execute(
            "select transaction_id, height, position from transactions where transaction_id between ? and ? "
            "order by transaction_id limit ?",
            (low, high, limit),
        ).fetchall()
        return [(bytes(row[0]), row[1], row[2]) for row in rows]

    # Own signed protocol messages, kept until their sequence is in a stored block.

    def save_messages(self, records: Iterable[tuple[str, int, int, bytes]]) -> None:
        self.write_round(records, [])

    def load_messages(self) -> list[tuple[str, int, int, bytes]]:
        return self._reader.execute(
            "select kind, view, sequence, data from signed_messages order by sequence, view"
        ).fetchall()

    def prune_messages(self, through_sequence: int, view: int, log_kinds: Iterable[str]) -> None:
        self.write_round([], [], (through_sequence, view, log_kinds))

    def _prune(self, through_sequence: int, view: int, log_kinds: Iterable[str]) -> None:
        """Drop records the protocol no longer needs: log kinds at or below the stable checkpoint,
        older stable-checkpoint certificates, and view-change records of earlier views."""
        kinds = list(log_kinds)
        marks = ",".join("?" * len(kinds))
        self._connection.execute(
            f"delete from signed_messages where kind in ({marks}) and sequence <= ?", (*kinds, through_sequence)
        )
        self._connection.execute(
            "delete from signed_messages where kind = 'stable-checkpoint' and sequence < ?", (through_sequence,)
        )
        self._connection.execute("delete from signed_messages where kind in ('view-change', 'new-view') and view < ?", (view,))

    # Evidence against other replicas: bounded, the oldest dropped first.

    def add_evidence(self, entries: Iterable[Evidence], per_replica_max: int, total_max: int = EVIDENCE_MAX) -> list[Evidence]:
        """Keep these (durably, one transaction); return the ones not already kept. Past
        `per_replica_max` entries against one replica, or `total_max` in all, the oldest go."""
        new = []
        with self._connection:
            self._connection.execute("begin")
            for evidence in entries:
                cursor = self._connection.execute(
                    "insert or ignore into evidence (replica_id, kind, view, sequence, data) values (?, ?, ?, ?, ?)",
                    (*evidence.key, evidence.encode()),
                )
                if cursor.rowcount:
                    new.append(evidence)
            for replica_id in {evidence.replica_id for evidence in new}:
                self._connection.execute(
                    "delete from evidence where replica_id = ? and id not in "
                    "(select id from evidence where replica_id = ? order by id desc limit ?)",
                    (replica_id, replica_id, per_replica_max),
                )
            self._connection.execute(
                "delete from evidence where id not in (select id from evidence order by id desc limit ?)", (total_max,)
            )
        return new

    def evidence(self, replica_id: int | None = None, limit: int = EVIDENCE_MAX) -> list[Evidence]:
        """Kept evidence, newest first, against one replica or all."""
        if replica_id is None:
            rows = self._reader.execute("select data from evidence order by id desc limit ?", (limit,)).fetchall()
        else:
            rows = self._reader.execute(
                "select data from evidence where replica_id = ? order by id desc limit ?", (replica_id, limit)
            ).fetchall()
        return [Evidence.decode(row[0]) for row in rows]

    def evidence_count(self) -> int:
        return int(self._reader.execute("select count(*) from evidence").fetchone()[0])

    def get_meta(self, key: str) -> bytes | None:
        row = self._reader.execute("select value from meta where key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: bytes) -> None:
        with self._connection:
            self._connection.execute("insert or replace into meta values (?, ?)", (key, value))
