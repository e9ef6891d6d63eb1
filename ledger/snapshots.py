"""Snapshot chunks of the application state, each checkable on its own against a certified state digest.

A chunk is a contiguous range of state buckets (ledger/state_tree.py) with every entry in them,
in bucket and entry order, and the Merkle siblings along both edges of the range. Whoever checks
it needs only the root (the state digest that 2f+1 CHECKPOINTs or a block's certificate sign):
a chunk that leaves out, adds, repeats, reorders or edits any entry, or misplaces its range,
does not lead to the root. So a joining replica can take chunks from peers it does not trust,
in any order and from several at once, and drop a peer at its first bad chunk.

A bucket too large for one chunk (only a client grinding keys into one bucket makes one) is sent
in parts: a part is a run of one bucket's entries, from entry `first_entry` of its `entry_count`,
with the hashes of the bucket's other entries on the part's first and last pages and the page
tree's siblings along its edges (ledger/state_tree.py), so it too is checked on its own against
the root. A fetch asks for a bucket from an entry on: from 0 at first, then from where the last
part taken ended.

Bounds: every chunk, part or not, holds at most CHUNK_ENTRIES_MAX entries and CHUNK_BYTES_MAX
bytes of encoded entries (the builder closes a chunk before it would pass either), or one entry
alone (at most ENTRY_BYTES_MAX, 17,421 bytes) whatever the bounds: a state of any shape is
served in chunks of bounded size. The decoder refuses a chunk over the bounds before it builds
its entries.
"""

from __future__ import annotations

import bisect
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
    PAGE_ENTRIES,
    VALUE,
    bucket_digest,
    bucket_of,
    entry_hash_of_encoded,
    entry_order,
    page_digest,
    page_digests,
    page_range_proof,
    page_range_root,
    paged_bucket_digest,
    range_root,
)
from ledger.transactions import KEY_LENGTH_MAX, VALUE_LENGTH_MAX

CHUNK_BYTES_MAX = 1 << 20
CHUNK_ENTRIES_MAX = 1 << 16
PROOF_LENGTH_MAX = 2 * BUCKET_BITS
# A part's page proof: two siblings a level, and a bucket of fewer than 2**63 entries has fewer
# than 2**58 pages.
PAGE_PROOF_LENGTH_MAX = 2 * 58
EDGE_HASHES_MAX = 2 * (PAGE_ENTRIES - 1)
# The largest entry: a value with the longest key and value, 4 bytes a character.
ENTRY_BYTES_MAX = 1 + 6 + 3 + 4 * KEY_LENGTH_MAX + 3 + 4 * VALUE_LENGTH_MAX

# An entry as a chunk carries it: (namespace, key, value), value (balance, nonce) for an account.
Entry = tuple[str, Any, Any]


class SnapshotError(ValueError):
    """A chunk is not exactly a range of the committed state; the message says how."""


@dataclass(frozen=True, slots=True)
class BucketPart:
    """Where a chunk's entries sit in their bucket, when the chunk holds a part of one bucket."""

    first_entry: int
    entry_count: int  # of the whole bucket: it fixes the bucket's page tree
    # The hashes of the bucket's entries outside the part on its first page (those before it),
    # then on its last page (those after it): what the part's pages are hashed with.
    edge_hashes: tuple[bytes, ...]
    page_proof: tuple[bytes, ...]

    def to_plain(self) -> list[Any]:
        return [self.first_entry, self.entry_count, list(self.edge_hashes), list(self.page_proof)]

    @classmethod
    def from_plain(cls, plain: Any) -> BucketPart:
        items = expect_list(plain, "bucket part", length=4)
        first_entry = expect_int(items[0], "part first entry", 0, INTEGER_MAX - 1)
        entry_count = expect_int(items[1], "part bucket entry count", first_entry + 1, INTEGER_MAX)
        edge_hashes = tuple(
            expect_bytes(item, "part edge hash", 32) for item in expect_list(items[2], "part edge hashes", length_max=EDGE_HASHES_MAX)
        )
        page_proof = tuple(
            expect_bytes(item, "part page proof hash", 32)
            for item in expect_list(items[3], "part page proof", length_max=PAGE_PROOF_LENGTH_MAX)
        )
        return cls(first_entry, entry_count, edge_hashes, page_proof)


@dataclass(frozen=True, slots=True)
class StateChunk:
    first_bucket: int
    last_bucket: int  # inclusive
    entries: tuple[Entry, ...]
    proof: tuple[bytes, ...]
    part: BucketPart | None = None  # None: every entry of buckets first..last

    def to_plain(self) -> list[Any]:
        plain = [
            self.first_bucket,
            self.last_bucket,
            [_entry_to_plain(entry) for entry in self.entries],
            list(self.proof),
        ]
        return plain if self.part is None else [*plain, self.part.to_plain()]

    def encode(self) -> bytes:
        return encode(self.to_plain())

    @property
    def first_entry(self) -> int:
        """The entry of its first bucket the chunk starts at: what a fetch of it asked for."""
        return 0 if self.part is None else self.part.first_entry

    def next_position(self) -> tuple[int, int] | None:
        """The (bucket, entry) the state goes on at after this chunk, None after the last bucket."""
        if self.part is not None and self.part.first_entry + len(self.entries) < self.part.entry_count:
            return (self.first_bucket, self.part.first_entry + len(self.entries))
        return None if self.last_bucket == BUCKET_COUNT - 1 else (self.last_bucket + 1, 0)

    @classmethod
    def from_plain(cls, plain: Any) -> StateChunk:
        """Decode strictly: shapes, types, ranges and the bounds; what the entries prove is verify_chunk's work."""
        if not isinstance(plain, list) or len(plain) not in (4, 5):
            raise CodecError("snapshot chunk: expected an array of 4 or 5 items")
        first_bucket = expect_int(plain[0], "chunk first bucket", 0, BUCKET_COUNT - 1)
        last_bucket = expect_int(plain[1], "chunk last bucket", first_bucket, BUCKET_COUNT - 1)
        part = None if len(plain) == 4 else BucketPart.from_plain(plain[4])
        if part is not None and first_bucket != last_bucket:
            raise CodecError("snapshot chunk: a part of a bucket covers one bucket")
        # verify_chunk's bounds (at its defaults), checked here so that what it would refuse is
        # refused before its entries are built: the count at once, the bytes as they add up.
        plain_entries = expect_list(plain[2], "chunk entries", length_max=CHUNK_ENTRIES_MAX)
        alone = len(plain_entries) == 1
        entries_list: list[Entry] = []
        size = 0
        for item in plain_entries:
            entry = _entry_from_plain(item)
            size += _entry_size(entry)
            if size > CHUNK_BYTES_MAX and not alone:
                raise CodecError(f"chunk entries: over the bound of {CHUNK_BYTES_MAX} bytes")
            entries_list.append(entry)
        if part is not None and (not entries_list or part.first_entry + len(entries_list) > part.entry_count):
            raise CodecError("snapshot chunk: a part's entries do not fit its bucket's entry count")
        proof = tuple(
            expect_bytes(item, "chunk proof hash", 32) for item in expect_list(plain[3], "chunk proof", length_max=PROOF_LENGTH_MAX)
        )
        return cls(first_bucket, last_bucket, tuple(entries_list), proof, part)


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


def _over_bounds(count: int, size: int, entries_max: int, bytes_max: int) -> bool:
    """Whether entries are more than a chunk may carry: one entry alone always fits."""
    return count > 1 and (count > entries_max or size > bytes_max)


def _edge_lengths(part: BucketPart, count: int) -> tuple[int, int]:
    """How many of the bucket's entries share the part's first page before it, and its last page after it."""
    end = part.first_entry + count
    last_page_end = min(((end - 1) // PAGE_ENTRIES + 1) * PAGE_ENTRIES, part.entry_count)
    return part.first_entry % PAGE_ENTRIES, last_page_end - end


def verify_chunk(
    root: bytes, chunk: StateChunk, entries_max: int = CHUNK_ENTRIES_MAX, bytes_max: int = CHUNK_BYTES_MAX
) -> list[Entry]:
    """The chunk's entries if it is exactly buckets first..last of the state with this root
    (every entry of those buckets, once each, in bucket then entry order, and nothing else), or
    for a part exactly entries first_entry.. of its bucket. Raises SnapshotError otherwise.
    Work: one encoding and two hashes per entry, the tree nodes over the range (at most
    2 * 65,536 hashes for the whole state in one chunk), and for a part two hashes a level of
    its bucket's page tree."""
    first, last = chunk.first_bucket, chunk.last_bucket
    if not 0 <= first <= last < BUCKET_COUNT:
        raise SnapshotError(f"bucket range {first}..{last} is not within 0..{BUCKET_COUNT - 1}")
    if len(chunk.proof) > PROOF_LENGTH_MAX:
        raise SnapshotError(f"a proof of {len(chunk.proof)} hashes is longer than any range needs ({PROOF_LENGTH_MAX})")
    if len(chunk.entries) > max(1, entries_max):
        raise SnapshotError(f"{len(chunk.entries)} entries exceed the bound of {entries_max} for a chunk")
    part = chunk.part
    if part is not None:
        _check_part_shape(chunk, part)
    digests: list[bytes] = []
    checked_entries: list[Entry] = []
    current_bucket = first
    current_hashes: list[bytes] = []
    previous: tuple[int, tuple[int, Any]] | None = None
    size = 0
    for entry in chunk.entries:
        try:
            checked = _entry_from_plain(_entry_to_plain(entry))
            encoded = _entry_encoding(checked)
        except (CodecError, TypeError, ValueError) as error:
            raise SnapshotError(f"an entry is malformed: {error}") from None
        namespace, key, _ = checked
        size += len(encoded)
        if _over_bounds(len(chunk.entries), size, entries_max, bytes_max):
            raise SnapshotError(f"the entries exceed the bound of {bytes_max} bytes for a chunk")
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
    if part is not None:
        digests = [_part_bucket_digest(part, current_hashes)]
    else:
        while current_bucket <= last:
            digests.append(bucket_digest(current_hashes) if current_hashes else EMPTY_BUCKET_DIGEST)
            current_hashes = []
            current_bucket += 1
    if range_root(digests, first, list(chunk.proof)) != root:
        raise SnapshotError(f"buckets {first}..{last} with this proof do not lead to the state digest (an entry is missing, extra or edited, or the proof is wrong)")
    return checked_entries  # as the decoder makes them (tuples), whatever types the chunk held


def _check_part_shape(chunk: StateChunk, part: BucketPart) -> None:
    """What a part must be before its hashes are worth computing."""
    if chunk.first_bucket != chunk.last_bucket:
        raise SnapshotError("a part of a bucket covers one bucket")
    if not chunk.entries or not 0 <= part.first_entry < part.first_entry + len(chunk.entries) <= part.entry_count <= INTEGER_MAX:
        raise SnapshotError(f"a part of {len(chunk.entries)} entries from entry {part.first_entry} does not fit a bucket of {part.entry_count}")
    before, after = _edge_lengths(part, len(chunk.entries))
    if len(part.edge_hashes) != before + after:
        raise SnapshotError(f"a part needs {before + after} edge hashes, not {len(part.edge_hashes)}")
    if len(part.page_proof) > PAGE_PROOF_LENGTH_MAX:
        raise SnapshotError(f"a page proof of {len(part.page_proof)} hashes is longer than any bucket needs")


def _part_bucket_digest(part: BucketPart, entry_hashes: list[bytes]) -> bytes:
    """The digest of the bucket a part is of, from its entries' hashes, its edge hashes and its page proof."""
    before, _ = _edge_lengths(part, len(entry_hashes))
    hashes = [*part.edge_hashes[:before], *entry_hashes, *part.edge_hashes[before:]]
    if part.entry_count <= PAGE_ENTRIES:
        if part.page_proof:
            raise SnapshotError("a part of a bucket of one page has no page proof")
        return page_digest(hashes)
    pages = [page_digest(hashes[start:start + PAGE_ENTRIES]) for start in range(0, len(hashes), PAGE_ENTRIES)]
    page_count = (part.entry_count + PAGE_ENTRIES - 1) // PAGE_ENTRIES
    page_root = page_range_root(pages, part.first_entry // PAGE_ENTRIES, page_count, list(part.page_proof))
    if page_root is None:
        raise SnapshotError("a part's page proof is not as long as its pages need")
    return paged_bucket_digest(part.entry_count, page_root)


class ChunkSource(Protocol):
    """A state chunks are built from: an AccountsApplication (its state now) or a FrozenState."""

    def bucket_entries(self, bucket: int) -> list[list[Any]]: ...

    def bucket_entry_hashes(self, bucket: int) -> list[bytes]: ...

    def state_range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]: ...


def _bucket_entries(application: ChunkSource, bucket: int) -> list[Entry]:
    return [
        (namespace, key, tuple(value) if namespace == ACCOUNT else value)
        for namespace, key, value in application.bucket_entries(bucket)
    ]


def chunk_starting_at(
    application: ChunkSource,
    first_bucket: int,
    entries_max: int = CHUNK_ENTRIES_MAX,
    bytes_max: int = CHUNK_BYTES_MAX,
    first_entry: int = 0,
) -> StateChunk:
    """The chunk of the application's current state from entry `first_entry` of bucket
    `first_bucket` on: as many whole buckets as fit the bounds, or, for a bucket that does not
    fit them alone (or from an entry after its first), a part of it with as many entries as fit
    (at least one). What a replica answers a fetch of that bucket and entry with. Raises
    SnapshotError if the bucket has no entry `first_entry` (other than 0)."""
    if not 0 <= first_bucket < BUCKET_COUNT:
        raise ValueError(f"bucket {first_bucket} is not within 0..{BUCKET_COUNT - 1}")
    if first_entry:
        return _part_starting_at(application, first_bucket, first_entry, entries_max, bytes_max, _bucket_entries(application, first_bucket))
    entries: list[Entry] = []
    size = 0
    last_bucket = first_bucket
    bucket = first_bucket
    occupied_of = getattr(application, "occupied_buckets", None)
    occupied = occupied_of() if occupied_of is not None else None
    while bucket < BUCKET_COUNT:
        if occupied is not None:
            # Empty buckets carry nothing and fit any chunk: go straight to the next one that has entries.
            index = bisect.bisect_left(occupied, bucket)
            if index == len(occupied):
                last_bucket = BUCKET_COUNT - 1
                break
            if occupied[index] > bucket:
                last_bucket = occupied[index] - 1
                bucket = occupied[index]
        found = _bucket_entries(application, bucket)
        found_size = sum(_entry_size(entry) for entry in found)
        if _over_bounds(len(entries) + len(found), size + found_size, entries_max, bytes_max):
            if bucket > first_bucket:
                break  # the chunk ends before it
            if len(found) > 1:
                return _part_starting_at(application, bucket, 0, entries_max, bytes_max, found)
        entries.extend(found)
        size += found_size
        last_bucket = bucket
        bucket += 1
    return StateChunk(first_bucket, last_bucket, tuple(entries), tuple(application.state_range_proof(first_bucket, last_bucket)))


def _part_starting_at(
    application: ChunkSource, bucket: int, first_entry: int, entries_max: int, bytes_max: int, found: list[Entry]
) -> StateChunk:
    count = len(found)
    if not 0 <= first_entry < count:
        raise SnapshotError(f"bucket {bucket} holds {count} entries: no part of it starts at entry {first_entry}")
    end = first_entry
    size = 0
    while end < count:
        size += _entry_size(found[end])
        if end > first_entry and _over_bounds(end + 1 - first_entry, size, entries_max, bytes_max):
            break
        end += 1
    hashes = application.bucket_entry_hashes(bucket)
    assert len(hashes) == count  # entries and hashes are of one state
    page_start = first_entry - first_entry % PAGE_ENTRIES
    last_page_end = min(((end - 1) // PAGE_ENTRIES + 1) * PAGE_ENTRIES, count)
    edge_hashes = (*hashes[page_start:first_entry], *hashes[end:last_page_end])
    page_proof: list[bytes] = []
    if count > PAGE_ENTRIES:
        page_proof = page_range_proof(page_digests(hashes), first_entry // PAGE_ENTRIES, (end - 1) // PAGE_ENTRIES)
    part = BucketPart(first_entry, count, edge_hashes, tuple(page_proof))
    return StateChunk(bucket, bucket, tuple(found[first_entry:end]), tuple(application.state_range_proof(bucket, bucket)), part)


def snapshot_chunks(
    application: ChunkSource, entries_max: int = CHUNK_ENTRIES_MAX, bytes_max: int = CHUNK_BYTES_MAX
) -> list[StateChunk]:
    """The whole state as chunks covering buckets 0..65,535 (and every entry) once each, in
    order. An application must not change meanwhile: serve a moving one's snapshot from its freeze()."""
    chunks: list[StateChunk] = []
    position: tuple[int, int] | None = (0, 0)
    while position is not None:
        chunks.append(chunk_starting_at(application, position[0], entries_max, bytes_max, position[1]))
        position = chunks[-1].next_position()
    return chunks


class _PartialBucket:
    """The entries of a bucket taken from parts so far, in their places."""

    def __init__(self, entry_count: int) -> None:
        self.entries: list[Entry | None] = [None] * entry_count
        self.filled = 0
        self.first_missing = 0


class SnapshotAssembly:
    """A state put together from verified chunks, in any order and from any peers.

    A chunk whose buckets (or entries of a bucket) are partly taken already adds only the
    others: two chunks that both verify against one root agree on every bucket and entry they
    share (or SHA-256 has a collision). Memory: the entries taken, one byte per bucket, and a
    slot per entry of a bucket being taken in parts (its count is the certified one)."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._covered = bytearray(BUCKET_COUNT)
        self.covered_buckets = 0
        self._accounts: list[tuple[bytes, int, int]] = []
        self._values: list[tuple[str, str]] = []
        self._partial: dict[int, _PartialBucket] = {}

    @property
    def complete(self) -> bool:
        return self.covered_buckets == BUCKET_COUNT

    def is_covered(self, bucket: int, entry: int = 0) -> bool:
        """Whether that bucket is taken, or that entry of it from a part."""
        if self._covered[bucket]:
            return True
        partial = self._partial.get(bucket)
        return partial is not None and entry < len(partial.entries) and partial.entries[entry] is not None

    def first_missing(self, from_bucket: int = 0) -> int | None:
        """The first bucket at or after `from_bucket` no chunk has covered yet."""
        index = self._covered.find(0, from_bucket)
        return None if index < 0 else index

    def first_missing_entry(self, bucket: int) -> int:
        """The first entry of a bucket not taken yet from its parts (0 if none was)."""
        partial = self._partial.get(bucket)
        if partial is None:
            return 0
        while partial.first_missing < len(partial.entries) and partial.entries[partial.first_missing] is not None:
            partial.first_missing += 1
        return partial.first_missing

    def add(self, chunk: StateChunk) -> int:
        """Take a chunk's buckets (or a part's entries) not taken yet, and return how many
        buckets that completed; raises SnapshotError (nothing taken) unless it verifies against
        the root."""
        entries = verify_chunk(self.root, chunk)
        covered = self._covered
        if chunk.part is not None:
            bucket = chunk.first_bucket
            if covered[bucket]:
                return 0
            partial = self._partial.get(bucket)
            if partial is None:
                partial = self._partial[bucket] = _PartialBucket(chunk.part.entry_count)
            for index, entry in enumerate(entries, start=chunk.part.first_entry):
                if partial.entries[index] is None:
                    partial.entries[index] = entry
                    partial.filled += 1
            if partial.filled < len(partial.entries):
                return 0
            entries = [entry for entry in partial.entries if entry is not None]
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
                self._partial.pop(bucket, None)
        self.covered_buckets += added
        return added

    def application(self) -> AccountsApplication:
        if not self.complete:
            raise SnapshotError(f"the snapshot is incomplete: {BUCKET_COUNT - self.covered_buckets} buckets are missing")
        application = AccountsApplication.from_entries(self._accounts, self._values)
        # Every chunk was checked, so this holds unless the two digest computations disagree (our bug).
        assert application.state_digest() == self.root
        return application
