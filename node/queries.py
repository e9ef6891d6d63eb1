"""Answering a client's read, without IO: the same logic for the Trio runtime and the simulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ledger.application import Application
from ledger.encoding import CodecError
from ledger.evidence import Evidence
from ledger.messages import (
    KEY_PREFIX_ANSWER_BYTES_MAX,
    KEY_PREFIX_MATCHES_MAX,
    QUERY_BEHIND,
    TRANSACTION_PREFIX_LENGTH_MIN,
    TRANSACTION_PREFIX_MATCHES_MAX,
    Query,
    QueryReply,
    pruned_reason,
)
from ledger.transactions import KEY_LENGTH_MAX

# Kinds answered from the stored ledger rather than the application's state.
LEDGER_QUERY_KINDS = ("transaction", "transaction-prefix", "block-hash", "evidence")
_HEX_DIGITS = frozenset("0123456789abcdef")
# Pieces of evidence in one answer, newest first: about 200 bytes each, so an answer fits the
# smallest frame a network may configure (64 KiB).
EVIDENCE_PER_REPLY_MAX = 256
ALL_REPLICAS = -1  # the `evidence` query's argument for evidence against any replica

EvidenceSource = Callable[[int | None, int], list[Evidence]]


class LedgerIndex(Protocol):
    """What answering a ledger query needs from the block store."""

    @property
    def height(self) -> int: ...

    def locate_transaction(self, transaction_id: bytes) -> tuple[int, int] | None: ...

    def block_hash(self, height: int) -> bytes | None: ...

    def transactions_with_prefix(self, prefix: str, limit: int) -> list[tuple[bytes, int, int]]: ...


def answer_query(
    query: Query,
    replica_id: int,
    application: Application,
    application_height: int,
    ledger: LedgerIndex,
    evidence: EvidenceSource | None = None,
    kept_from_height: int = 1,
) -> QueryReply:
    """The unsigned QUERY-REPLY for `query`; the caller signs it. `evidence(replica or None, limit)`
    lists the evidence this replica keeps (newest first); without it an `evidence` query gets none.

    `kept_from_height` is the first block the ledger keeps (above 1 once pruned): a block-hash
    read below it, or a transaction not found in the kept blocks, is refused with an error that
    starts with PRUNED rather than answered "no such block / transaction", which may be false.

    The reported height is the height of the state the answer was read from: the application's
    for its kinds, the store's for ledger kinds (the store may trail the application by the round
    being written). Below the query's min_height nothing is answered: a stale answer could hide
    the client's own confirmed write. Answering "behind" at once, rather than holding the query
    until the replica catches up, keeps the replica stateless per query, so a client asking for
    a height that never comes costs it nothing; the client asks again shortly.
    """
    height = ledger.height if query.kind in LEDGER_QUERY_KINDS else application_height
    result: Any = None
    error = ""
    if height < query.min_height:
        error = f"{QUERY_BEHIND} height {height} below {query.min_height}"
    else:
        try:
            result = _result(query, application, ledger, evidence)
        except CodecError as problem:
            error = str(problem)
        if not error and kept_from_height > 1:
            error = _pruned_problem(query, result, kept_from_height)
            result = None if error else result
    return QueryReply(query.query_id, query.digest, replica_id, height, result, error)


def _pruned_problem(query: Query, result: Any, kept_from_height: int) -> str:
    """Why a read cannot be answered from the blocks kept, or "" if it can."""
    if query.kind == "block-hash" and query.argument < kept_from_height:
        return pruned_reason(kept_from_height)
    if query.kind in ("transaction", "transaction-prefix") and not result:
        return pruned_reason(kept_from_height, "not found in the blocks kept (older ones may hold it)")
    return ""


def _result(query: Query, application: Application, ledger: LedgerIndex, evidence: EvidenceSource | None) -> Any:
    if query.kind == "evidence":
        # Each replica reports what it saw itself: the client checks every signature, and merges.
        if not isinstance(query.argument, int) or query.argument < ALL_REPLICAS:
            raise CodecError("evidence query: expected a replica id, or -1 for all")
        if evidence is None:
            return []
        against = None if query.argument == ALL_REPLICAS else query.argument
        return [item.to_plain() for item in evidence(against, EVIDENCE_PER_REPLY_MAX)]
    if query.kind == "transaction":
        if not isinstance(query.argument, bytes):
            raise CodecError("transaction query: expected a transaction id")
        location = ledger.locate_transaction(query.argument)
        return None if location is None else list(location)
    if query.kind == "transaction-prefix":
        prefix = query.argument
        if not isinstance(prefix, str) or not TRANSACTION_PREFIX_LENGTH_MIN <= len(prefix) <= 64 or not _HEX_DIGITS.issuperset(prefix):
            raise CodecError(f"transaction-prefix query: expected {TRANSACTION_PREFIX_LENGTH_MIN} to 64 lowercase hex digits")
        # One more than listed, so the client can tell "exactly the maximum" from "more".
        matches = ledger.transactions_with_prefix(prefix, TRANSACTION_PREFIX_MATCHES_MAX + 1)
        return [[transaction_id, height, position] for transaction_id, height, position in matches]
    if query.kind == "block-hash":
        if not isinstance(query.argument, int) or query.argument < 1:
            raise CodecError("block-hash query: expected a height")
        return ledger.block_hash(query.argument) if query.argument <= ledger.height else None
    if query.kind == "key-prefix":
        return values_with_prefix(application, query.argument)
    return application.query(query.kind, query.argument)


def values_with_prefix(application: Application, prefix: Any) -> list[Any]:
    """The answer to a 'key-prefix' query: [[[key, value], ...] in key order, truncated], bounded
    in entries and bytes (see KEY_PREFIX_MATCHES_MAX); the same state gives every replica the
    same answer, so honest answers match and reach a quorum."""
    if not isinstance(prefix, str) or len(prefix) > KEY_LENGTH_MAX:
        raise CodecError(f"key-prefix query: expected text of at most {KEY_LENGTH_MAX} characters")
    entries: list[list[str]] = []
    size_bytes = 0
    for key, value in application.values_with_prefix(prefix):
        size_bytes += len(key.encode()) + len(value.encode())
        if len(entries) == KEY_PREFIX_MATCHES_MAX or size_bytes > KEY_PREFIX_ANSWER_BYTES_MAX:
            return [entries, True]
        entries.append([key, value])
    return [entries, False]
