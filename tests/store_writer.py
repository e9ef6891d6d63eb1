"""Crash-test helper: appends certified blocks to a ledger store until killed, announcing each append."""

# Usage: python tests/store_writer.py STORE_PATH NETWORK_ID
# Prints "opened H" once, then "appending H" just before and "appended H" just after each append.

from __future__ import annotations

import sys
from pathlib import Path

from chain_helpers import build_chain, make_network

from ledger.storage import BlockStore

APPENDS_MAX = 100_000  # a bound in case nobody kills the writer


def main() -> int:
    path, network_id = Path(sys.argv[1]), sys.argv[2]
    network = make_network(network_id)
    store = BlockStore.open(path, network.genesis)
    print(f"opened {store.height}", flush=True)
    for _ in range(APPENDS_MAX):
        # One, two or three blocks per append, so a kill can land inside a multi-block transaction.
        count = 1 + store.height % 3
        blocks = build_chain(network, count, transactions_per_block=4, parent_hash=store.last_hash, parent_height=store.height)
        print(f"appending {blocks[-1].height}", flush=True)
        store.append(blocks)
        print(f"appended {store.height}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
