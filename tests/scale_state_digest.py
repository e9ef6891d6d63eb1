"""The state digest's costs against the state size: a block's update, and the recompute on restart, per entry."""

# Usage: python tests/scale_state_digest.py [ENTRIES ...]   (default: 10000 100000)
# For each size: build the state from its entries (what a restart does, ledger/restore.py), then
# execute blocks of 400 transfers to new accounts and time the digest update after each. The old
# AdHash sum's update cost is printed beside it for comparison. Timings are printed, never asserted.

from __future__ import annotations

import hashlib
import sys
import time

from ledger.application import AccountsApplication
from ledger.encoding import encode
from ledger.snapshots import snapshot_chunks, verify_chunk
from ledger.transactions import Transaction, Transfer

TRANSACTIONS_PER_BLOCK = 400
BLOCKS = 10


def adhash_update_seconds(changes: int) -> float:
    """What the replaced AdHash sum paid for `changes` entry updates (two 1024-bit hashes each)."""
    total = 0
    started = time.perf_counter()
    for index in range(changes):
        for version in (0, 1):
            plain = encode(["account", index.to_bytes(32, "big"), [version, 0]])
            total += int.from_bytes(hashlib.shake_256(plain).digest(128))
        total %= 1 << 1024
    return time.perf_counter() - started


def measure(entries: int) -> None:
    accounts = [(index.to_bytes(32, "big"), 1_000_000, 0) for index in range(entries // 2)]
    values = [(f"key {index:09d}", f"value {index}") for index in range(entries - len(accounts))]
    started = time.perf_counter()
    application = AccountsApplication.from_entries(accounts, values)
    application.state_digest()
    rebuild = time.perf_counter() - started

    update_seconds = []
    block_seconds = []
    for block in range(BLOCKS):
        transactions = [
            Transaction(accounts[(block * TRANSACTIONS_PER_BLOCK + index) % len(accounts)][0], 0 if block * TRANSACTIONS_PER_BLOCK + index < len(accounts) else 1,
                        Transfer((10**12 + block * TRANSACTIONS_PER_BLOCK + index).to_bytes(32, "big"), 1), bytes(64))
            for index in range(TRANSACTIONS_PER_BLOCK)
        ]
        started = time.perf_counter()
        application.execute_block(transactions)
        executed = time.perf_counter()
        application.state_digest()
        update_seconds.append(time.perf_counter() - executed)
        block_seconds.append(time.perf_counter() - started)
    median = sorted(update_seconds)[len(update_seconds) // 2]
    block_median = sorted(block_seconds)[len(block_seconds) // 2]

    started = time.perf_counter()
    chunks = snapshot_chunks(application)
    chunk_seconds = time.perf_counter() - started
    started = time.perf_counter()
    root = application.state_digest()
    for chunk in chunks:
        verify_chunk(root, chunk)
    verify_seconds = time.perf_counter() - started
    print(
        f"{entries:>8} entries: restart recompute {rebuild * 1000:8.1f} ms ({rebuild / entries * 1e6:5.2f} us/entry); "
        f"digest update per block of {TRANSACTIONS_PER_BLOCK} transfers (about {2 * TRANSACTIONS_PER_BLOCK} entries) "
        f"median {median * 1000:5.2f} ms after the execution's entry hashing (execute and digest {block_median * 1000:5.2f} ms; "
        f"AdHash's hashing alone was {adhash_update_seconds(2 * TRANSACTIONS_PER_BLOCK) * 1000:5.2f} ms); "
        f"snapshot of {len(chunks)} chunks built in {chunk_seconds * 1000:.0f} ms, verified in {verify_seconds * 1000:.0f} ms "
        f"({verify_seconds / application.entry_count() * 1e6:.2f} us/entry)",
        flush=True,
    )


if __name__ == "__main__":
    for size in [int(argument) for argument in sys.argv[1:]] or [10_000, 100_000]:
        measure(size)
