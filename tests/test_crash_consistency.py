"""A replica killed at any statement of a write (blocks, index, state, records, prune, commit) or right after it restarts with its state at its tip: no block lost or applied twice."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from chain_helpers import make_network

from ledger.restore import restore_application
from ledger.storage import BlockStore

WRITER = Path(__file__).with_name("state_writer.py")
NETWORK_ID = "crash-state-net"
NETWORK = make_network(NETWORK_ID)
BLOCKS_PER_WRITE = 3  # as state_writer.py writes them


def run_writer(path: Path, kill_at: int) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(WRITER), str(path), NETWORK_ID, str(kill_at)],
        capture_output=True,
        text=True,
        cwd=WRITER.parent,
        timeout=60,
    )
    expected = 0 if kill_at == 0 else -signal.SIGKILL
    assert result.returncode == expected, result.stdout + result.stderr
    return result.stdout.split()


def restart(path: Path) -> tuple[int, int | None, int, bytes]:
    """Open as a replica does; (height, state height, blocks re-executed, state digest)."""
    store = BlockStore.open(path, NETWORK.genesis)
    try:
        restored = restore_application(store, NETWORK.config)
        return store.height, store.state_height, restored.blocks_replayed, restored.application.state_digest()
    finally:
        store.close()


def signed_record_heights(path: Path) -> set[int]:
    connection = sqlite3.connect(path)
    try:
        return {row[0] for row in connection.execute("select sequence from signed_messages")}
    finally:
        connection.close()


def test_a_kill_at_every_statement_of_a_write_loses_or_doubles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    words = run_writer(path, 0)  # one whole write, counting its statements
    assert words[:3] == ["opened", "0", "0"] and words[3] == "statements"
    statements = int(words[4])
    assert statements >= 20  # begin, records, blocks and index rows, state rows, meta, prunes, commit
    height = BLOCKS_PER_WRITE
    for kill_at in range(1, statements + 2):
        words = run_writer(path, kill_at)
        assert words == ["opened", str(height), "0"], (kill_at, words)  # the last round left its state at its tip
        recovered, state_height, replayed, _ = restart(path)
        # Killed before the commit finished: the write is wholly absent; killed after it: wholly there.
        expected = height + BLOCKS_PER_WRITE if kill_at == statements + 1 else height
        assert (recovered, state_height, replayed) == (expected, expected, 0), f"killed at statement {kill_at}"
        records = signed_record_heights(path)
        assert (max(records) == expected) if records else expected == 0, f"records and blocks disagree after statement {kill_at}"
        height = recovered
    assert height == 2 * BLOCKS_PER_WRITE
