"""`make scale`: how a replica's start grows with its history: chains of 10k and 100k transactions, before (replay from genesis) and after (durable state)."""

# Usage: python tests/scale_restart.py [TRANSACTIONS ...]   (default: 10000 100000)
# Builds each chain with certified, really executed blocks (every put writes a new key, so the
# state grows with the history: the worst case for a start that reads the state), then times the
# work from "open the store" to "state ready" three ways. Timings are printed, never asserted.

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from chain_helpers import extend_executed_chain, make_network

from ledger.application import AccountsApplication
from ledger.blocks import verify_execution
from ledger.restore import audit_store, restore_application
from ledger.storage import BlockStore

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
    print(
        f"{transactions:>12} {height:>7} {entries:>13} {before_s:>9.2f} {after_s:>8.3f} {after_cpu_s:>12.3f} "
        f"{gap_s * 1000:>12.2f} {load_s / max(entries, 1) * 1e6:>19.1f} {check_s:>8.2f}   (built in {build_s:.0f} s)",
        flush=True,
    )


def main() -> int:
    sizes = [int(argument) for argument in sys.argv[1:]] or [10_000, 100_000]
    print(
        f"{'transactions':>12} {'blocks':>7} {'state entries':>13} {'before s':>9} {'after s':>8} {'after cpu s':>12} "
        f"{'gap check ms':>12} {'state load us/entry':>19} {'check s':>8}",
        flush=True,
    )
    for transactions in sizes:
        measure(transactions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
