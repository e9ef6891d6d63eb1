"""Snapshot chunks of the application state, each checkable on its own against a certified state digest.

A chunk is a contiguous range of state buckets (ledger/state_tree.py) with every entry in them,
in bucket and entry order, and the Merkle siblings along both edges of the range. Whoever checks
it needs only the root (the state digest that 2f+1 CHECKPOINTs or a block's certificate sign):
a chunk that leaves out, adds, repeats, reorders or edits any entry, or misplaces its range,
does not lead to the root. So a joining replica can take chunks from peers it does not trust,
in any order and from several at once, and drop a peer at its first bad chunk.

Bounds: a chunk of several buckets holds at most CHUNK_ENTRIES_MAX entries and
CHUNK_BYTES_MAX bytes of encoded entries (the builder closes a chunk before it would pass
either). A single bucket over those bounds is a chunk of its own, up to BUCKET_ENTRIES_MAX and
BUCKET_BYTES_MAX; a bucket beyond that (only a client grinding keys into one bucket makes one)
cannot be sent as a snapshot (the builder refuses it), and a replica must catch up from
blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ledger.application import AccountsApplication
from ledger.crypto import PUBLIC_KEY_SIZE
from ledger.encoding import (
    INTEGER_MAX,
    CodecError,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.state_tree import (
    ACCOUNT,
    BUCKET_BITS,
    BUCKET_COUNT,
    EMPTY_BUCKET_DIGEST,
    VALUE,
    bucket_digest,
    bucket_of,
    entry_hash_of_encoded,
    entry_order,
    range_root,
)
from ledger.transactions import KEY_LENGTH_MAX, VALUE_LENGTH_MAX

CHUNK_BYTES_MAX = 1 << 20
CHUNK_ENTRIES_MAX = 1 << 16
BUCKET_BYTES_MAX = 4 << 20  # within the default 8 MiB frame
BUCKET_ENTRIES_MAX = 1 << 18
PROOF_LENGTH_MAX = 2 * BUCKET_BITS

# An entry as a chunk carries it: (namespace, key, value), value (balance, nonce) for an account.
Entry = tuple[str, Any, Any]


class SnapshotError(ValueError):
    """A chunk is not exactly a range of the committed state; the message says how."""


@dataclass(frozen=True, slots=True)
class StateChunk:
    first_bucket: int
    last_bucket: int  # inclusive
    entries: tuple[Entry, ...]
    proof: tuple[bytes, ...]

    def to_plain(self) -> list[Any]:
        return [
            self.first_bucket,
            self.last_bucket,
            [_entry_to_plain(entry) for entry in self.entries],
            list(self.proof),
        ]

    def encode(self) -> bytes:
        return encode(self.to_plain())

    @classmethod
    def from_plain(cls, plain: Any) -> StateChunk:
        """Decode strictly: shapes, types and ranges; what the entries prove is verify_chunk's work."""
        items = expect_list(plain, "snapshot chunk", length=4)
        first_bucket = expect_int(items[0], "chunk first bucket", 0, BUCKET_COUNT - 1)
        last_bucket = expect_int(items[1], "chunk last bucket", first_bucket, BUCKET_COUNT - 1)
        # verify_chunk's bounds (at its defaults), checked here so that what it would refuse is
        # refused before its entries are built: the count at once, the bytes as they add up.
        count_max, size_max = _bounds(first_bucket == last_bucket, CHUNK_ENTRIES_MAX, CHUNK_BYTES_MAX)
        plain_entries = expect_list(items[2], "chunk entries", length_max=count_max)
        entries_list: list[Entry] = []
        size = 0
        for item in plain_entries:
            entry = _entry_from_plain(item)
            size += _entry_size(entry)
            if size > size_max:
                raise CodecError(f"chunk entries: over the bound of {size_max} bytes for a chunk of this range")
            entries_list.append(entry)
        entries = tuple(entries_list)
        proof = tuple(
            expect_bytes(item, "chunk proof hash", 32) for item in expect_list(items[3], "chunk proof", length_max=PROOF_LENGTH_MAX)
        )
        return cls(first_bucket, last_bucket, entries, proof)


def _entry_from_plain(plain: Any) -> Entry:
    items = expect_list(plain, "chunk entry", length=3)
    namespace = expect_text(items[0], "chunk entry namespace", 16)
    if namespace == ACCOUNT:
        balance, nonce = expect_list(items[2], "chunk account value", length=2)
        return (
            ACCOUNT,
            expect_bytes(items[1], "chunk account", PUBLIC_KEY_SIZE),
            (expect_int(balance, "chunk balance", 0, INTEGER_MAX), expect_int(nonce, "chunk nonce", 0, INTEGER_MAX)),
        )
    if namespace == VALUE:
        return (VALUE, expect_text(items[1], "chunk key", KEY_LENGTH_MAX), expect_text(items[2], "chunk value", VALUE_LENGTH_MAX))
    raise CodecError(f"chunk entry namespace {namespace!r} is unknown")


def _entry_to_plain(entry: Entry) -> list[Any]:
    namespace, key, value = entry
    return [namespace, key, list(value) if namespace == ACCOUNT else value]


def _entry_encoding(entry: Entry) -> bytes:
    return encode(_entry_to_plain(entry))


def _head_size(value: int) -> int:
    """The canonical CBOR head of an unsigned integer, or of a length."""
    if value < 24:
        return 1
    return 2 if value < 1 << 8 else 3 if value < 1 << 16 else 5 if value < 1 << 32 else 9


def _text_size(text: str) -> int:
    length = len(text) if text.isascii() else len(text.encode("utf-8"))
    return _head_size(length) + length


def _entry_size(entry: Entry) -> int:
    """len(_entry_encoding(entry)) of a well-formed entry, without encoding it."""
    namespace, key, value = entry
    if namespace == ACCOUNT:
        balance, nonce = value
        return 1 + _text_size(namespace) + _head_size(len(key)) + len(key) + 1 + _head_size(balance) + _head_size(nonce)
    return 1 + _text_size(namespace) + _text_size(key) + _text_size(value)


def _bounds(single_bucket: bool, entries_max: int, bytes_max: int) -> tuple[int, int]:
    """The entries and bytes a chunk may carry: a lone bucket has bounds of its own."""
    return (BUCKET_ENTRIES_MAX, BUCKET_BYTES_MAX) if single_bucket else (entries_max, bytes_max)


def verify_chunk(
    root: bytes, chunk: StateChunk, entries_max: int = CHUNK_ENTRIES_MAX, bytes_max: int = CHUNK_BYTES_MAX
) -> list[Entry]:
    """The chunk's entries if it is exactly buckets first..last of the state with this root:
    every entry of those buckets, once each, in bucket then entry order, and nothing else.
    Raises SnapshotError otherwise. Work: one encoding and two hashes per entry, and the
    tree nodes over the range (at most 2 * 65,536 hashes for the whole state in one chunk)."""
    first, last = chunk.first_bucket, chunk.last_bucket
    if not 0 <= first <= last < BUCKET_COUNT:
        raise SnapshotError(f"bucket range {first}..{last} is not within 0..{BUCKET_COUNT - 1}")
    if len(chunk.proof) > PROOF_LENGTH_MAX:
        raise SnapshotError(f"a proof of {len(chunk.proof)} hashes is longer than any range needs ({PROOF_LENGTH_MAX})")
    count_max, size_max = _bounds(first == last, entries_max, bytes_max)
    if len(chunk.entries) > count_max:
        raise SnapshotError(f"{len(chunk.entries)} entries exceed the bound of {count_max} for a chunk of this range")
    digests: list[bytes] = []
    checked_entries: list[Entry] = []
    current_bucket = first
    current_hashes: list[bytes] = []
    previous: tuple[int, tuple[int, Any]] | None = None
    size = 0
    for entry in chunk.entries:
        try:
            checked = _entry_from_plain(_entry_to_plain(entry))
        except (CodecError, TypeError, ValueError) as error:
            raise SnapshotError(f"an entry is malformed: {error}") from None
        namespace, key, _ = checked
        encoded = _entry_encoding(checked)
        size += len(encoded)
        if size > size_max:
            raise SnapshotError(f"the entries exceed the bound of {size_max} bytes for a chunk of this range")
        bucket = bucket_of(namespace, key)
        if not first <= bucket <= last:
            raise SnapshotError(f"an entry of bucket {bucket} is outside the chunk's buckets {first}..{last}")
        position = (bucket, entry_order(namespace, key))
        if previous is not None and not previous < position:
            raise SnapshotError("entries are not in strictly increasing bucket and key order (repeated or reordered)")
        previous = position
        while current_bucket < bucket:
            digests.append(bucket_digest(current_hashes) if current_hashes else EMPTY_BUCKET_DIGEST)
            current_hashes = []
            current_bucket += 1
        current_hashes.append(entry_hash_of_encoded(encoded))
        checked_entries.append(checked)
    while current_bucket <= last:
        digests.append(bucket_digest(current_hashes) if current_hashes else EMPTY_BUCKET_DIGEST)
        current_hashes = []
        current_bucket += 1
    if range_root(digests, first, list(chunk.proof)) != root:
        raise SnapshotError(f"buckets {first}..{last} with this proof do not lead to the state digest (an entry is missing, extra or edited, or the proof is wrong)")
    return checked_entries  # as the decoder makes them (tuples), whatever types the chunk held


class ChunkSource(Protocol):
    """A state chunks are built from: an AccountsApplication (its state now) or a FrozenState."""

    def bucket_entries(self, bucket: int) -> list[list[Any]]: ...

    def state_range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]: ...


def chunk_starting_at(
    application: ChunkSource, first_bucket: int, entries_max: int = CHUNK_ENTRIES_MAX, bytes_max: int = CHUNK_BYTES_MAX
) -> StateChunk:
    """The chunk of the application's current state from `first_bucket` on, as many whole
    buckets as fit the bounds (at least one). What a replica answers a fetch of that bucket with.
    Raises SnapshotError if that bucket alone is over the bounds of any chunk."""
    if not 0 <= first_bucket < BUCKET_COUNT:
        raise ValueError(f"bucket {first_bucket} is not within 0..{BUCKET_COUNT - 1}")
    entries: list[Entry] = []
    size = 0
    last_bucket = first_bucket
    bucket = first_bucket
    while bucket < BUCKET_COUNT:
        found = [
            (namespace, key, tuple(value) if namespace == ACCOUNT else value)
            for namespace, key, value in application.bucket_entries(bucket)
        ]
        found_size = sum(len(_entry_encoding(entry)) for entry in found)
        if len(found) > BUCKET_ENTRIES_MAX or found_size > BUCKET_BYTES_MAX:
            if bucket == first_bucket:
                raise SnapshotError(
                    f"bucket {bucket} holds {len(found)} entries of {found_size} bytes, over what a chunk may carry "
                    f"({BUCKET_ENTRIES_MAX} entries, {BUCKET_BYTES_MAX} bytes)"
                )
            break  # the chunk ends before it; a request starting there is refused
        if bucket > first_bucket and (len(entries) + len(found) > entries_max or size + found_size > bytes_max):
            break
        entries.extend(found)
        size += found_size
        last_bucket = bucket
        bucket += 1
        if bucket - 1 == first_bucket and (len(found) > entries_max or found_size > bytes_max):
            break  # an oversize bucket is a chunk of its own
    return StateChunk(first_bucket, last_bucket, tuple(entries), tuple(application.state_range_proof(first_bucket, last_bucket)))


def snapshot_chunks(
    application: ChunkSource, entries_max: int = CHUNK_ENTRIES_MAX, bytes_max: int = CHUNK_BYTES_MAX
) -> list[StateChunk]:
    """The whole state as chunks covering buckets 0..65,535 once each, in order. An
    application must not change meanwhile: serve a moving one's snapshot from its freeze()."""
    chunks: list[StateChunk] = []
    bucket = 0
    while bucket < BUCKET_COUNT:
        chunks.append(chunk_starting_at(application, bucket, entries_max, bytes_max))
        bucket = chunks[-1].last_bucket + 1
    return chunks


class SnapshotAssembly:
    """A state put together from verified chunks, in any order and from any peers.

    A chunk whose buckets are partly taken already adds only the others: two chunks that both
    verify against one root agree on every bucket they share (or SHA-256 has a collision).
    Memory: the entries taken, and one byte per bucket."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._covered = bytearray(BUCKET_COUNT)
        self.covered_buckets = 0
        self._accounts: list[tuple[bytes, int, int]] = []
        self._values: list[tuple[str, str]] = []

    @property
    def complete(self) -> bool:
        return self.covered_buckets == BUCKET_COUNT

    def is_covered(self, bucket: int) -> bool:
        return bool(self._covered[bucket])

    def first_missing(self, from_bucket: int = 0) -> int | None:
        """The first bucket at or after `from_bucket` no chunk has covered yet."""
        index = self._covered.find(0, from_bucket)
        return None if index < 0 else index

    def add(self, chunk: StateChunk) -> int:
        """Take a chunk's buckets not taken yet, and return how many; raises SnapshotError
        (nothing taken) unless it verifies against the root."""
        entries = verify_chunk(self.root, chunk)
        covered = self._covered
        for namespace, key, value in entries:
            if not covered[bucket_of(namespace, key)]:
                if namespace == ACCOUNT:
                    self._accounts.append((key, value[0], value[1]))
                else:
                    self._values.append((key, value))
        added = 0
        for bucket in range(chunk.first_bucket, chunk.last_bucket + 1):
            if not covered[bucket]:
                covered[bucket] = 1
                added += 1
        self.covered_buckets += added
        return added

    def application(self) -> AccountsApplication:
        if not self.complete:
            raise SnapshotError(f"the snapshot is incomplete: {BUCKET_COUNT - self.covered_buckets} buckets are missing")
        application = AccountsApplication.from_entries(self._accounts, self._values)
        # Every chunk was checked, so this holds unless the two digest computations disagree (our bug).
        assert application.state_digest() == self.root
        return application
