"""Which rounds a replica writes on its event-loop thread (node/runtime.py write_inline): only small ones."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from node.runtime import (
    EVENTS_PER_ROUND_MAX,
    INLINE_WRITE_EVENTS_MAX,
    INLINE_WRITE_RECORD_BYTES_MAX,
    INLINE_WRITE_TRANSACTIONS_MAX,
    write_inline,
)


def block_of(transactions: int) -> Any:
    return SimpleNamespace(transactions=[object()] * transactions)


def record_of(size: int) -> tuple[str, int, int, bytes]:
    return ("commit", 0, 1, bytes(size))


def test_a_round_of_one_transaction_at_a_time_writes_inline() -> None:
    assert write_inline(1, [record_of(200)], [])
    assert write_inline(INLINE_WRITE_EVENTS_MAX, [record_of(200)], [block_of(1)])
    assert write_inline(0, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX)])


def test_a_busy_or_large_round_keeps_the_worker_thread() -> None:
    """Many events (the connections must be served meanwhile), big blocks or big records (a full
    pre-prepare) never stall the event loop on the disk."""
    assert not write_inline(INLINE_WRITE_EVENTS_MAX + 1, [record_of(200)], [])
    assert not write_inline(EVENTS_PER_ROUND_MAX, [], [])
    assert not write_inline(1, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX + 1)])
    assert not write_inline(1, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX), block_of(1)])
    assert not write_inline(0, [record_of(INLINE_WRITE_RECORD_BYTES_MAX + 1)], [])
