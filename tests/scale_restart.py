"""`make scale`: how a replica's start and a new replica's join grow with the history: chains of 10k and 100k transactions."""

# Usage: python tests/scale_restart.py [TRANSACTIONS ...]   (default: 10000 100000)
# Builds each chain with certified, really executed blocks (every put writes a new key, so the
# state grows with the history: the worst case for a start that reads the state), then times the
# work from "open the store" to "state ready" three ways, and a join by state sync in one process
# (every chunk built by a serving replica's keeper, checked against the certified root, assembled,
# installed in an empty store, which then opens): what a joiner costs apart from the network.
# Timings are printed, never asserted.

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from chain_helpers import extend_executed_chain, make_network

from ledger.application import AccountsApplication, StateChanges
from ledger.blocks import verify_execution
from ledger.messages import CheckpointCertificate, FetchSnapshot
from ledger.restore import audit_store, restore_application
from ledger.snapshots import SnapshotAssembly
from ledger.state_tree import BUCKET_COUNT
from ledger.storage import BlockStore
from node.snapshot_keeper import SnapshotKeeper

NETWORK = make_network("scale-net")
TRANSACTIONS_PER_BLOCK = 25  # about what the measured chain held (13,300 in 527 blocks)
BLOCKS_PER_WRITE = 20
T = TypeVar("T")


def build(path: Path, transactions: int) -> None:
    store = BlockStore.open(path, NETWORK.genesis)
    application = restore_application(store, NETWORK.config).application
    blocks_left = transactions // TRANSACTIONS_PER_BLOCK
    while blocks_left:
        count = min(blocks_left, BLOCKS_PER_WRITE)
        blocks = extend_executed_chain(
            NETWORK, application, store.last_hash, store.height, count, TRANSACTIONS_PER_BLOCK, distinct_keys=True
        )
        store.write_round([], blocks, None, application.take_changes())
        blocks_left -= count
    store.close()


def timed(work: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def start_before(path: Path) -> int:
    """What a start did before the state was durable: verify every block, re-execute every block."""
    store = BlockStore.open(path, NETWORK.genesis, verify=False)
    store.verify(recent_max=None)
    application = AccountsApplication(NETWORK.balances)
    for block in store.iterate_blocks():
        verify_execution(application, block)
    store.close()
    return store.height


def start_after(path: Path) -> tuple[int, int]:
    store = BlockStore.open(path, NETWORK.genesis)
    restored = restore_application(store, NETWORK.config)
    store.close()
    return restored.blocks_replayed, restored.state_entries


def join(path: Path, joined_path: Path) -> tuple[int, int]:
    """Serve the tip's state chunk by chunk, check and assemble every chunk, install it in an
    empty store and open that store: (chunks, bytes of chunks)."""
    store = BlockStore.open(path, NETWORK.genesis, verify=False)
    served = restore_application(store, NETWORK.config).application
    tip = store.block(store.height)
    store.close()
    assert tip is not None
    keeper = SnapshotKeeper()
    keeper.freeze(tip.height, served)
    keeper.stable(CheckpointCertificate(tip.height, tip.header.state_digest, tip.block_hash, ()))
    assembly = SnapshotAssembly(tip.header.state_digest)
    chunks = size = 0
    bucket: int | None = 0
    while bucket is not None:
        answer = keeper.answer(FetchSnapshot(tip.height, bucket))
        assert answer is not None and answer.chunk is not None
        size += len(answer.chunk.encode())
        chunks += 1
        assembly.add(answer.chunk)
        bucket = assembly.first_missing(0) if answer.chunk.last_bucket < BUCKET_COUNT - 1 else None
    application = assembly.application()
    accounts, values = application.snapshot()
    joined = BlockStore.open(joined_path, NETWORK.genesis)
    joined.install_snapshot(tip, StateChanges(tuple(map(tuple, accounts)), tuple(map(tuple, values))), application.state_digest())
    joined.close()
    start_after(joined_path)
    return chunks, size


def measure(transactions: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ledger.sqlite3"
        build_s, _ = timed(lambda: build(path, transactions))
        before_s, height = timed(lambda: start_before(path))
        start_after(path)  # read the file once more, so both measurements start from a warm page cache
        after_s, (replayed, entries) = timed(lambda: start_after(path))
        after_cpu_s = time.process_time()
        start_after(path)
        after_cpu_s = time.process_time() - after_cpu_s
        assert replayed == 0
        store = BlockStore.open(path, NETWORK.genesis, verify=False)
        gap_s, _ = timed(lambda: store._reader.execute("select count(*) from blocks").fetchone())
        loaded = store.load_state()
        assert loaded is not None
        load_s, _ = timed(lambda: AccountsApplication.from_entries(loaded[2], loaded[3]))
        check_s, _ = timed(lambda: audit_store(store, NETWORK.config))
        store.close()
        join_s, (chunks, chunk_bytes) = timed(lambda: join(path, Path(directory) / "joined.sqlite3"))
    print(
        f"{transactions:>12} {height:>7} {entries:>13} {before_s:>9.2f} {after_s:>8.3f} {after_cpu_s:>12.3f} "
        f"{gap_s * 1000:>12.2f} {load_s / max(entries, 1) * 1e6:>19.1f} {check_s:>8.2f} {join_s:>7.2f} "
        f"{chunks:>6} {chunk_bytes / 1e6:>9.1f}   (built in {build_s:.0f} s)",
        flush=True,
    )


def main() -> int:
    sizes = [int(argument) for argument in sys.argv[1:]] or [10_000, 100_000]
    print(
        f"{'transactions':>12} {'blocks':>7} {'state entries':>13} {'before s':>9} {'after s':>8} {'after cpu s':>12} "
        f"{'gap check ms':>12} {'state load us/entry':>19} {'check s':>8} {'join s':>7} {'chunks':>6} {'chunk MB':>9}",
        flush=True,
    )
    for transactions in sizes:
        measure(transactions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
