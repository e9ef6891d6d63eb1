"""Crash-test helper: commits executed blocks with their state, and SIGKILLs itself at one chosen SQL statement of its first write."""

# Usage: python tests/state_writer.py STORE_PATH NETWORK_ID KILL_AT
# Prints "opened HEIGHT REPLAYED" once. KILL_AT=0 counts: it makes one write and prints
# "statements N" (how many SQL statements one write runs). KILL_AT=k in 1..N kills the process
# as statement k of the write starts; k=N+1 kills it right after the write returned, before
# anything else happens (as a replica could die between its write and its sends).

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from chain_helpers import extend_executed_chain, make_network

from ledger.restore import restore_application
from ledger.storage import BlockStore

BLOCKS_PER_WRITE = 3


def main() -> int:
    path, network_id, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    network = make_network(network_id)
    store = BlockStore.open(path, network.genesis)
    restored = restore_application(store, network.config)
    application = restored.application
    print(f"opened {store.height} {restored.blocks_replayed}", flush=True)
    blocks = extend_executed_chain(network, application, store.last_hash, store.height, BLOCKS_PER_WRITE, 2, distinct_keys=True)
    changes = application.take_changes()
    # A round as the runtime writes it: signed records, blocks with their state, a prune.
    records = [("commit", 0, block.height, b"record") for block in blocks]
    prune = (blocks[0].height, 0, ("commit",))
    statements = 0

    def count(statement: str) -> None:
        nonlocal statements
        statements += 1
        if statements == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store._connection.set_trace_callback(count)
    store.write_round(records, blocks, prune, changes)
    store._connection.set_trace_callback(None)
    if kill_at == statements + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    print(f"statements {statements}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
