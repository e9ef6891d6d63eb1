"""Tests of snapshot chunks: they cover the state exactly once, and each one is refused at any tampering."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from bucket_helpers import GROUND_BUCKET, GROUND_KEYS
from chain_helpers import deterministic_key

from ledger.application import AccountsApplication
from ledger.crypto import NetworkIdentity
from ledger.encoding import CodecError, decode
from ledger.snapshots import (
    CHUNK_BYTES_MAX,
    CHUNK_ENTRIES_MAX,
    BucketPart,
    SnapshotAssembly,
    SnapshotError,
    StateChunk,
    chunk_starting_at,
    snapshot_chunks,
    verify_chunk,
)
from ledger.state_tree import (
    ACCOUNT,
    BUCKET_COUNT,
    PAGE_ENTRIES,
    VALUE,
    bucket_digest,
    bucket_of,
    entry_hash,
    entry_order,
    page_digest,
)
from ledger.transactions import VALUE_LENGTH_MAX, Put, Transfer, sign_transaction

NETWORK = NetworkIdentity("snapshot-net", bytes(32))
ENTRIES_MAX = 40
BYTES_MAX = 4000


def populated() -> AccountsApplication:
    """About 1,500 entries: enough that some buckets hold two or more."""
    accounts = [(index.to_bytes(32, "big"), 1000 + index, index % 7) for index in range(500)]
    values = [(f"key {index}", f"value {index}" * (index % 5)) for index in range(1000)]
    return AccountsApplication.from_entries(accounts, values)


APPLICATION = populated()
ROOT = APPLICATION.state_digest()
CHUNKS = snapshot_chunks(APPLICATION, ENTRIES_MAX, BYTES_MAX)


def shared_bucket_chunk() -> StateChunk:
    """A chunk with a bucket holding at least two entries."""
    for chunk in CHUNKS:
        buckets = [bucket_of(namespace, key) for namespace, key, _ in chunk.entries]
        if len(set(buckets)) < len(buckets):
            return chunk
    raise AssertionError("no bucket holds two entries")


def key_in_range(first: int, last: int) -> str:
    """A value key that the state does not hold whose bucket is in first..last."""
    index = 0
    while not first <= bucket_of(VALUE, f"extra {index}") <= last:
        index += 1
    return f"extra {index}"


def with_entries(chunk: StateChunk, entries: list[Any]) -> StateChunk:
    return dataclasses.replace(chunk, entries=tuple(entries))


def sorted_entries(entries: list[Any]) -> list[Any]:
    return sorted(entries, key=lambda entry: (bucket_of(entry[0], entry[1]), entry_order(entry[0], entry[1])))


def test_chunks_cover_the_whole_state_exactly_once() -> None:
    assert len(CHUNKS) > 10
    assert CHUNKS[0].first_bucket == 0 and CHUNKS[-1].last_bucket == BUCKET_COUNT - 1
    for before, after in zip(CHUNKS, CHUNKS[1:], strict=False):
        assert after.first_bucket == before.last_bucket + 1
    entries = [entry for chunk in CHUNKS for entry in verify_chunk(ROOT, chunk, ENTRIES_MAX, BYTES_MAX)]
    assert len(entries) == len({(namespace, key) for namespace, key, _ in entries}) == APPLICATION.entry_count()
    for chunk in CHUNKS:
        assert len(chunk.entries) <= ENTRIES_MAX or chunk.first_bucket == chunk.last_bucket
    assembly = SnapshotAssembly(ROOT)
    for chunk in CHUNKS:
        assembly.add(chunk)
    rebuilt = assembly.application()
    assert rebuilt.snapshot() == APPLICATION.snapshot()
    assert rebuilt.state_digest() == ROOT


def test_a_state_after_real_blocks_is_rebuilt_from_its_chunks_and_executes_on_alike() -> None:
    alice, bob = deterministic_key("alice"), deterministic_key("bob")
    original = AccountsApplication({alice.public_key: 1000})
    original.execute_block([sign_transaction(NETWORK, alice, nonce, Put(f"k{nonce}", "v")) for nonce in range(30)])
    assembly = SnapshotAssembly(original.state_digest())
    for chunk in snapshot_chunks(original):
        assembly.add(StateChunk.from_plain(decode(chunk.encode())))
    rebuilt = assembly.application()
    block = [sign_transaction(NETWORK, alice, 30, Transfer(bob.public_key, 5)), sign_transaction(NETWORK, alice, 31, Put("k1", "w"))]
    assert original.execute_block(block) == rebuilt.execute_block(block)
    assert original.state_digest() == rebuilt.state_digest()


def test_an_empty_state_is_one_chunk() -> None:
    empty = AccountsApplication({})
    [chunk] = snapshot_chunks(empty)
    assert (chunk.first_bucket, chunk.last_bucket, chunk.entries, chunk.proof) == (0, BUCKET_COUNT - 1, (), ())
    assert verify_chunk(empty.state_digest(), chunk) == []


def test_a_bucket_over_the_bounds_is_sent_in_parts() -> None:
    shared = shared_bucket_chunk()
    bucket = next(
        bucket
        for bucket in range(shared.first_bucket, shared.last_bucket + 1)
        if len(APPLICATION.bucket_entries(bucket)) >= 2
    )
    count = len(APPLICATION.bucket_entries(bucket))
    parts = [chunk_starting_at(APPLICATION, bucket, entries_max=1, bytes_max=BYTES_MAX, first_entry=entry) for entry in range(count)]
    assert all(part.first_bucket == part.last_bucket == bucket and len(part.entries) == 1 for part in parts)
    assert [part.part.first_entry if part.part else None for part in parts] == list(range(count))
    taken = [entry for part in parts for entry in verify_chunk(ROOT, part, entries_max=1)]
    assert taken == [tuple(entry[:2]) + (entry[2],) for entry in APPLICATION.bucket_entries(bucket)]
    # Several buckets over the bound are refused, even with a proof that holds.
    wide = chunk_starting_at(APPLICATION, bucket, entries_max=ENTRIES_MAX, bytes_max=BYTES_MAX)
    assert wide.last_bucket > wide.first_bucket and len(wide.entries) > 1
    verify_chunk(ROOT, wide, ENTRIES_MAX, BYTES_MAX)
    with pytest.raises(SnapshotError, match="exceed the bound"):
        verify_chunk(ROOT, wide, entries_max=1)
    with pytest.raises(SnapshotError, match="exceed the bound"):
        verify_chunk(ROOT, wide, bytes_max=50)
    with pytest.raises(SnapshotError, match="no part of it starts at entry"):
        chunk_starting_at(APPLICATION, bucket, first_entry=count)


def missing_entry(chunk: StateChunk) -> StateChunk:
    return with_entries(chunk, list(chunk.entries[1:]))


def extra_entry(chunk: StateChunk) -> StateChunk:
    key = key_in_range(chunk.first_bucket, chunk.last_bucket)
    return with_entries(chunk, sorted_entries([*chunk.entries, (VALUE, key, "planted")]))


def duplicate_entry(chunk: StateChunk) -> StateChunk:
    return with_entries(chunk, [chunk.entries[0], *chunk.entries])


def unsorted_entries(chunk: StateChunk) -> StateChunk:
    entries = list(chunk.entries)
    entries[0], entries[1] = entries[1], entries[0]
    return with_entries(chunk, entries)


def swapped_within_a_bucket(chunk: StateChunk) -> StateChunk:
    entries = list(chunk.entries)
    buckets = [bucket_of(namespace, key) for namespace, key, _ in entries]
    index = next(index for index in range(len(buckets) - 1) if buckets[index] == buckets[index + 1])
    entries[index], entries[index + 1] = entries[index + 1], entries[index]
    return with_entries(chunk, entries)


def entry_of_another_bucket(chunk: StateChunk) -> StateChunk:
    other = next(entry for other in CHUNKS if other is not chunk for entry in other.entries)
    return with_entries(chunk, [*chunk.entries, other])


def edited_value(chunk: StateChunk) -> StateChunk:
    index = next(index for index, entry in enumerate(chunk.entries) if entry[0] == VALUE)
    entries = list(chunk.entries)
    entries[index] = (VALUE, entries[index][1], entries[index][2] + "!")
    return with_entries(chunk, entries)


def edited_balance(chunk: StateChunk) -> StateChunk:
    index = next(index for index, entry in enumerate(chunk.entries) if entry[0] == ACCOUNT)
    entries = list(chunk.entries)
    namespace, key, (balance, nonce) = entries[index]
    entries[index] = (namespace, key, (balance + 1, nonce))
    return with_entries(chunk, entries)


def value_passed_off_as_account(chunk: StateChunk) -> StateChunk:
    index = next(index for index, entry in enumerate(chunk.entries) if entry[0] == ACCOUNT)
    entries = list(chunk.entries)
    entries[index] = (VALUE, entries[index][1].hex()[:32], "0")
    return with_entries(chunk, entries)


def truncated_proof(chunk: StateChunk) -> StateChunk:
    return dataclasses.replace(chunk, proof=chunk.proof[:-1])


def extra_proof_hash(chunk: StateChunk) -> StateChunk:
    return dataclasses.replace(chunk, proof=(*chunk.proof, chunk.proof[0]))


def wrong_proof_hash(chunk: StateChunk) -> StateChunk:
    return dataclasses.replace(chunk, proof=(bytes(32), *chunk.proof[1:]))


def shifted_range(chunk: StateChunk) -> StateChunk:
    return dataclasses.replace(chunk, first_bucket=chunk.first_bucket + 1, last_bucket=chunk.last_bucket + 1)


def narrowed_range(chunk: StateChunk) -> StateChunk:
    """The last bucket dropped from the range but its entries kept: caught as out of range."""
    return dataclasses.replace(chunk, last_bucket=chunk.last_bucket - 1)


def narrowed_range_and_entries(chunk: StateChunk) -> StateChunk:
    """The last non-empty bucket and its entries dropped, the proof kept: the range no longer fits the proof."""
    last = bucket_of(chunk.entries[-1][0], chunk.entries[-1][1])
    kept = [entry for entry in chunk.entries if bucket_of(entry[0], entry[1]) < last]
    return dataclasses.replace(chunk, last_bucket=last - 1, entries=tuple(kept))


def widened_range(chunk: StateChunk) -> StateChunk:
    return dataclasses.replace(chunk, last_bucket=chunk.last_bucket + 1)


TAMPERINGS: list[Callable[[StateChunk], StateChunk]] = [
    missing_entry, extra_entry, duplicate_entry, unsorted_entries, swapped_within_a_bucket, entry_of_another_bucket,
    edited_value, edited_balance, value_passed_off_as_account, truncated_proof, extra_proof_hash, wrong_proof_hash,
    shifted_range, narrowed_range, narrowed_range_and_entries, widened_range,
]


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=[tamper.__name__ for tamper in TAMPERINGS])
def test_verify_chunk_refuses_each_kind_of_tampering(tamper: Callable[[StateChunk], StateChunk]) -> None:
    chunk = shared_bucket_chunk()
    assert any(entry[0] == ACCOUNT for entry in chunk.entries) and any(entry[0] == VALUE for entry in chunk.entries)
    verify_chunk(ROOT, chunk, ENTRIES_MAX, BYTES_MAX)
    tampered = tamper(chunk)
    assert tampered != chunk
    with pytest.raises(SnapshotError):
        verify_chunk(ROOT, tampered, ENTRIES_MAX, BYTES_MAX)
    # And through the wire: either the decoder or the verifier refuses it.
    with pytest.raises((SnapshotError, CodecError)):
        verify_chunk(ROOT, StateChunk.from_plain(decode(tampered.encode())), ENTRIES_MAX, BYTES_MAX)


def test_a_chunk_of_another_state_is_refused() -> None:
    other = AccountsApplication.from_entries([], [("key 0", "something else")])
    with pytest.raises(SnapshotError):
        verify_chunk(other.state_digest(), CHUNKS[0], ENTRIES_MAX, BYTES_MAX)


def test_a_bad_chunk_leaves_the_assembly_as_it_was() -> None:
    assembly = SnapshotAssembly(ROOT)
    assert assembly.add(CHUNKS[0]) == CHUNKS[0].last_bucket + 1
    with pytest.raises(SnapshotError):
        assembly.add(edited_value(CHUNKS[1]) if any(entry[0] == VALUE for entry in CHUNKS[1].entries) else missing_entry(CHUNKS[1]))
    assert assembly.first_missing() == CHUNKS[1].first_bucket
    with pytest.raises(SnapshotError, match="incomplete"):
        assembly.application()
    for chunk in CHUNKS[1:]:  # the honest peer's chunks, after the bad one was refused
        assembly.add(chunk)
    assert assembly.application().state_digest() == ROOT


def test_chunks_in_any_order_and_overlapping_make_the_state_once() -> None:
    """Chunks cut at other places (another peer's bounds) overlap; each bucket is taken once."""
    other_cut = snapshot_chunks(APPLICATION, ENTRIES_MAX * 3, BYTES_MAX * 3)
    assembly = SnapshotAssembly(ROOT)
    for chunk in [*CHUNKS[1::2], *other_cut[::-1], *CHUNKS[::2]]:
        assembly.add(chunk)
    assert assembly.complete and assembly.first_missing() is None
    assert assembly.application().snapshot() == APPLICATION.snapshot()
    assert assembly.add(CHUNKS[0]) == 0


GOOD_PLAIN = CHUNKS[0].to_plain()


@pytest.mark.parametrize(
    "plain",
    [
        None,
        [0, 1, []],
        [-1, 0, [], []],
        [0, BUCKET_COUNT, [], []],
        [5, 4, [], []],
        [0, 0, [["account", b"x" * 31, [1, 0]]], []],
        [0, 0, [["account", b"x" * 32, [-1, 0]]], []],
        [0, 0, [["account", b"x" * 32, [1]]], []],
        [0, 0, [["value", "k" * 257, "v"]], []],
        [0, 0, [["value", "k", "v" * 4097]], []],
        [0, 0, [["other", "k", "v"]], []],
        [0, 0, [["value", "k"]], []],
        [0, 0, [], [bytes(31)]],
        [0, 0, [], [bytes(32)] * 33],
        [GOOD_PLAIN[0], GOOD_PLAIN[1], GOOD_PLAIN[2], GOOD_PLAIN[3], 0],
    ],
)
def test_malformed_chunks_are_refused_by_the_decoder(plain: Any) -> None:
    with pytest.raises(CodecError):
        StateChunk.from_plain(plain)


def test_a_chunk_round_trips_through_its_encoding() -> None:
    for chunk in CHUNKS[:5]:
        assert StateChunk.from_plain(decode(chunk.encode())) == chunk


def test_a_frozen_state_serves_its_chunks_while_the_application_moves_on() -> None:
    """What a replica serves at a stable checkpoint while it executes later blocks."""
    alice, bob = deterministic_key("alice"), deterministic_key("bob")
    application = AccountsApplication({alice.public_key: 1000, bob.public_key: 10})
    application.execute_block([sign_transaction(NETWORK, alice, nonce, Put(f"k{nonce}", "v")) for nonce in range(40)])
    checkpoint_digest, checkpoint_state = application.state_digest(), application.snapshot()
    view = application.freeze()
    later = [sign_transaction(NETWORK, alice, 40, Transfer(bob.public_key, 5))]
    later += [sign_transaction(NETWORK, alice, 41 + index, Put(f"k{index % 60}", "new")) for index in range(80)]
    application.execute_block(later)
    second_digest, second_state = application.state_digest(), application.snapshot()
    second_view = application.freeze()
    application.execute_block([sign_transaction(NETWORK, bob, 0, Put("k0", "bob's"))])
    assert len({checkpoint_digest, second_digest, application.state_digest()}) == 3

    for frozen, digest, state in ((view, checkpoint_digest, checkpoint_state), (second_view, second_digest, second_state)):
        assert frozen.state_digest() == digest
        assembly = SnapshotAssembly(digest)
        for chunk in snapshot_chunks(frozen, entries_max=8, bytes_max=400):
            assembly.add(chunk)
        assert assembly.application().snapshot() == state
    # The live state's chunks are of the live digest, not the frozen one.
    with pytest.raises(SnapshotError):
        verify_chunk(checkpoint_digest, snapshot_chunks(application)[0])


def test_a_released_frozen_state_stops_following_the_application() -> None:
    application = populated()
    view = application.freeze()
    application.query("get", "key 1")  # reads change nothing
    assert view.changed_entries == 0
    alice = deterministic_key("alice")
    application.execute_block([sign_transaction(NETWORK, alice, 0, Put("key 1", "changed"))])
    assert view.changed_entries == 2  # alice's account (new) and the value
    view.release()
    application.execute_block([sign_transaction(NETWORK, alice, 1, Put("key 2", "changed"))])
    assert view.changed_entries == 2
    with pytest.raises(ValueError, match="released"):
        view.bucket_entries(0)


def test_verify_chunk_returns_entries_exactly_as_the_builder_makes_them() -> None:
    """Found by review: verify_chunk returned the entries it was given, so an account value sent
    as a list (which encodes, hashes and verifies the same) came back a list, not a tuple."""
    chunk = next(chunk for chunk in CHUNKS if any(entry[0] == ACCOUNT for entry in chunk.entries))
    listed = with_entries(chunk, [(namespace, key, list(value) if namespace == ACCOUNT else value) for namespace, key, value in chunk.entries])
    entries = verify_chunk(ROOT, listed, ENTRIES_MAX, BYTES_MAX)
    assert entries == list(chunk.entries)
    assert all(type(entry) is tuple and (entry[0] != ACCOUNT or type(entry[2]) is tuple) for entry in entries)


def test_an_entry_size_is_its_encoded_size() -> None:
    import ledger.snapshots as snapshots

    entries: list[Any] = [entry for chunk in CHUNKS[:3] for entry in chunk.entries]
    entries += [
        (VALUE, "", ""), (VALUE, "k" * 23, "v" * 24), (VALUE, "\U0001f600" * 256, "\u00e9" * 4096), (VALUE, "k" * 255, "v" * 65_536),
        (ACCOUNT, bytes(32), (0, 0)), (ACCOUNT, bytes(32), (23, 24)), (ACCOUNT, bytes(32), (2**32, 2**63 - 1)), (ACCOUNT, bytes(32), (255, 65_536)),
    ]
    for entry in entries:
        assert snapshots._entry_size(entry) == len(snapshots._entry_encoding(entry)), entry


def test_the_decoder_refuses_a_chunk_over_the_verifiers_bounds_before_building_its_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the decoder let every chunk carry as many entries as a lone bucket may
    (262,144), four times what verify_chunk takes for several buckets, and never looked at the
    bytes: a 2.4 MB frame of tiny entries decoded to about 57 MB of objects before any check."""
    import ledger.snapshots as snapshots

    built: list[Any] = []
    real = snapshots._entry_from_plain
    monkeypatch.setattr(snapshots, "_entry_from_plain", lambda plain: built.append(plain) or real(plain))
    with pytest.raises(CodecError, match="entries"):
        StateChunk.from_plain([0, 1, [["value", "", ""]] * (snapshots.CHUNK_ENTRIES_MAX + 1), []])
    assert built == []
    # By bytes: 65 values of 16 KiB and a bit are over the 1 MiB of a chunk of several buckets.
    wide = ["value", "k", "\U0001f600" * 4096]
    with pytest.raises(CodecError, match="bytes"):
        StateChunk.from_plain([0, 1, [wide] * 65, []])
    assert len(built) <= 65
    # What the verifier takes, the decoder takes.
    for chunk in CHUNKS:
        assert StateChunk.from_plain(decode(chunk.encode())) == chunk


# ---- a bucket a client grew past what a chunk carries, by grinding keys into it ----

WIDE_VALUE = "\U0001f600" * VALUE_LENGTH_MAX  # the largest value a Put writes: 16 KiB encoded


def ground_state(key_count: int, value: str = "v") -> AccountsApplication:
    values = [(key, value) for key in GROUND_KEYS[:key_count]] + [(f"key {index}", f"value {index}") for index in range(300)]
    return AccountsApplication.from_entries([(index.to_bytes(32, "big"), 1000, 0) for index in range(100)], values)


def entry_bytes(chunk: StateChunk) -> int:
    import ledger.snapshots as snapshots

    return sum(snapshots._entry_size(entry) for entry in chunk.entries)


def test_a_ground_bucket_over_the_chunk_bytes_is_served_in_bounded_parts() -> None:
    """Found by review: a bucket over BUCKET_BYTES_MAX (4 MiB: about 256 puts of the largest
    values, their keys ground into one bucket with about 2**24 hashes in all) made the whole state
    unsnapshottable, since a bucket had to be a chunk of its own; and any lone bucket up to 4 MiB
    was a chunk past CHUNK_BYTES_MAX. Here, scaled: 70 values of 16 KiB (1.1 MiB) in one bucket."""
    application = ground_state(70, WIDE_VALUE)
    root = application.state_digest()
    assert len(application.bucket_entries(GROUND_BUCKET)) == 70
    chunks = snapshot_chunks(application)
    assert all(entry_bytes(chunk) <= CHUNK_BYTES_MAX for chunk in chunks)
    parts = [chunk for chunk in chunks if chunk.part is not None]
    assert len(parts) == 2 and [part.first_entry for part in parts] == [0, len(parts[0].entries)]
    assembly = SnapshotAssembly(root)
    for chunk in reversed(chunks):
        assembly.add(StateChunk.from_plain(decode(chunk.encode())))
    assert assembly.application().snapshot() == application.snapshot()


@pytest.mark.parametrize("key_count", [2, 32, 33, 70])
def test_parts_of_any_length_verify_and_rebuild_the_state(key_count: int) -> None:
    application = ground_state(key_count)
    root = application.state_digest()
    hashes = application.bucket_entry_hashes(GROUND_BUCKET)
    # A bucket of up to one page keeps the one-pass digest: a state's digest changes only past it.
    assert (bucket_digest(hashes) == page_digest(hashes)) == (key_count <= PAGE_ENTRIES)
    for entries_max in (1, 5, 31, 32, 33):
        chunks = snapshot_chunks(application, entries_max=entries_max, bytes_max=10**6)
        parts = [chunk for chunk in chunks if chunk.part is not None and chunk.first_bucket == GROUND_BUCKET]
        assert sum(len(part.entries) for part in parts) == (key_count if key_count > entries_max else 0)
        assembly = SnapshotAssembly(root)
        for chunk in [*chunks[1::2], *chunks[::2]]:
            verify_chunk(root, chunk, entries_max, 10**6)
            assembly.add(chunk)
        assert assembly.application().snapshot() == application.snapshot()


def test_a_frozen_state_serves_the_parts_of_a_bucket_changed_since() -> None:
    application = ground_state(70)
    view = application.freeze()
    frozen_root, frozen_state = application.state_digest(), application.snapshot()
    for key in GROUND_KEYS[:70:3]:
        application._set_value(key, "later")
    application._set_value(GROUND_KEYS[70 - 1] + "!", "new")  # maybe in another bucket: either way the view holds
    assembly = SnapshotAssembly(frozen_root)
    for chunk in snapshot_chunks(view, entries_max=10, bytes_max=10**6):
        assembly.add(chunk)
    assert assembly.application().snapshot() == frozen_state


PART_APPLICATION = ground_state(70)
PART_ROOT = PART_APPLICATION.state_digest()
# Entries 30..34 of 70: across the first two pages, with edge hashes on both sides.
PART = chunk_starting_at(PART_APPLICATION, GROUND_BUCKET, entries_max=5, bytes_max=10**6, first_entry=30)


def with_part(chunk: StateChunk, **changes: Any) -> StateChunk:
    assert chunk.part is not None
    return dataclasses.replace(chunk, part=dataclasses.replace(chunk.part, **changes))


def part_tamperings() -> list[tuple[str, StateChunk]]:
    part = PART.part
    assert part is not None and part.first_entry == 30 and len(PART.entries) == 5 and len(part.edge_hashes) == 30 + 29
    entries = list(PART.entries)
    edited = [*entries[:2], (VALUE, entries[2][1], "edited"), *entries[3:]]
    first = chunk_starting_at(PART_APPLICATION, GROUND_BUCKET, entries_max=5, bytes_max=10**6)
    bucket_entries = PART_APPLICATION.bucket_entries(GROUND_BUCKET)
    shifted = [tuple(entry[:2]) + (entry[2],) for entry in bucket_entries[31:36]]
    return [
        ("entry edited", with_entries(PART, edited)),
        ("entry left out", with_entries(PART, entries[1:])),
        ("entries of the next place", dataclasses.replace(PART, entries=tuple(shifted))),
        ("first entry moved", with_part(PART, first_entry=31)),
        ("entry count plus one", with_part(PART, entry_count=71)),
        ("entry count minus one", with_part(PART, entry_count=69)),
        ("bucket of one page claimed", with_part(PART, entry_count=32, page_proof=())),
        ("edge hash edited", with_part(PART, edge_hashes=(bytes(32), *part.edge_hashes[1:]))),
        ("edge hashes moved across", with_part(PART, edge_hashes=(*part.edge_hashes[1:31], part.edge_hashes[0], *part.edge_hashes[31:]))),
        ("edge hash left out", with_part(PART, edge_hashes=part.edge_hashes[:-1])),
        ("page proof edited", with_part(PART, page_proof=(bytes(32), *part.page_proof[1:]))),
        ("page proof truncated", with_part(PART, page_proof=part.page_proof[:-1])),
        ("page proof extended", with_part(PART, page_proof=(*part.page_proof, bytes(32)))),
        ("part passed off as the whole bucket", dataclasses.replace(PART, part=None)),
        ("the first part passed off as the whole bucket", dataclasses.replace(first, part=None)),
        ("another bucket's proof", dataclasses.replace(PART, proof=tuple(PART_APPLICATION.state_range_proof(GROUND_BUCKET + 1, GROUND_BUCKET + 1)))),
        ("part of two buckets", dataclasses.replace(PART, last_bucket=GROUND_BUCKET + 1)),
        ("no entries", with_entries(PART, [])),
        ("entry of another bucket", with_entries(PART, [*entries, CHUNKS[0].entries[0]])),
    ]


@pytest.mark.parametrize("name, tampered", part_tamperings(), ids=[name for name, _ in part_tamperings()])
def test_verify_chunk_refuses_each_kind_of_tampering_with_a_part(name: str, tampered: StateChunk) -> None:
    assert verify_chunk(PART_ROOT, PART) == list(PART.entries)
    with pytest.raises(SnapshotError):
        verify_chunk(PART_ROOT, tampered)
    assembly = SnapshotAssembly(PART_ROOT)
    with pytest.raises(SnapshotError):
        assembly.add(tampered)
    assert assembly.first_missing_entry(GROUND_BUCKET) == 0


@pytest.mark.parametrize(
    "plain",
    [
        [5, 6, [["value", "k", "v"]], [], [0, 2, [], []]],
        [5, 5, [["value", "k", "v"]], [], [0, 0, [], []]],
        [5, 5, [["value", "k", "v"]], [], [-1, 2, [], []]],
        [5, 5, [["value", "k", "v"]], [], [1, 1, [], []]],
        [5, 5, [["value", "k", "v"]], [], [0, 2, [bytes(32)] * 63, []]],
        [5, 5, [["value", "k", "v"]], [], [0, 2, [], [bytes(32)] * 117]],
        [5, 5, [["value", "k", "v"]], [], [0, 2, [bytes(31)], []]],
        [5, 5, [], [], [0, 2, [], []]],
        [5, 5, [["value", "k", "v"]] * 3, [], [0, 2, [], []]],
        [5, 5, [["value", "k", "v"]], [], [0, 2, [], []], None],
        [5, 5, [["value", "k", "v"]], [], [0, 2, []]],
    ],
)
def test_malformed_parts_are_refused_by_the_decoder(plain: Any) -> None:
    with pytest.raises(CodecError):
        StateChunk.from_plain(plain)


def test_a_part_round_trips_through_its_encoding() -> None:
    assert StateChunk.from_plain(decode(PART.encode())) == PART
    assert isinstance(PART.part, BucketPart) and PART.next_position() == (GROUND_BUCKET, 35)


def test_an_assembly_takes_parts_that_overlap_and_come_in_any_order() -> None:
    """Peers with other bounds cut a bucket elsewhere: every part is placed by its first entry."""
    assembly = SnapshotAssembly(PART_ROOT)
    starts = [(40, 20), (0, 7), (5, 32), (60, 3), (30, 12), (63, 7)]
    for first_entry, entries_max in starts:
        chunk = chunk_starting_at(PART_APPLICATION, GROUND_BUCKET, entries_max=entries_max, bytes_max=10**6, first_entry=first_entry)
        assert assembly.add(chunk) == (1 if first_entry == 63 else 0)
    assert assembly.is_covered(GROUND_BUCKET)
    for chunk in snapshot_chunks(PART_APPLICATION, entries_max=9, bytes_max=10**6):
        assembly.add(chunk)
    assert assembly.application().snapshot() == PART_APPLICATION.snapshot()
    assert entry_hash(*PART_APPLICATION.bucket_entries(GROUND_BUCKET)[0]) == PART_APPLICATION.bucket_entry_hashes(GROUND_BUCKET)[0]


class _WalkEveryBucket:
    """A chunk source without occupied_buckets: chunks built from it walk all 65,536 buckets."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def bucket_entries(self, bucket: int) -> list[list[Any]]:
        return self.source.bucket_entries(bucket)

    def bucket_entry_hashes(self, bucket: int) -> list[bytes]:
        return self.source.bucket_entry_hashes(bucket)

    def state_range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]:
        return self.source.state_range_proof(first_bucket, last_bucket)


@pytest.mark.parametrize("seed", range(6))
def test_chunks_skipping_empty_buckets_are_the_chunks_of_a_walk_over_every_bucket(seed: int) -> None:
    # Found by an adversarial review: on a sparse state one 19-byte FetchSnapshot made the server
    # walk all 65,536 buckets (about 0.1 s); chunks now jump from one occupied bucket to the next.
    generator = random.Random(seed)
    application = AccountsApplication({})
    for index in range(generator.choice([3, 40, 400])):
        application._set_value(f"key-{seed}-{index}", "v" * generator.randrange(1, 300))
    frozen = application.freeze()
    application._set_value("after-the-freeze", "x")
    for source in (application, frozen):
        for first_bucket in [0, generator.randrange(65_536), 65_535]:
            for entries_max, bytes_max in [(CHUNK_ENTRIES_MAX, CHUNK_BYTES_MAX), (5, 2_000)]:
                fast = chunk_starting_at(source, first_bucket, entries_max, bytes_max)
                slow = chunk_starting_at(_WalkEveryBucket(source), first_bucket, entries_max, bytes_max)
                assert fast == slow


def test_a_chunk_of_a_sparse_state_reads_only_its_occupied_buckets() -> None:
    # The hole: a 19-byte FetchSnapshot cost the serving replica a walk over all 65,536 buckets.
    application = AccountsApplication({deterministic_key(f"sparse-{index}").public_key: 10 for index in range(10)})
    frozen = application.freeze()
    reads = []

    class Counting(_WalkEveryBucket):
        def bucket_entries(self, bucket: int) -> list[list[Any]]:
            reads.append(bucket)
            return self.source.bucket_entries(bucket)

        def occupied_buckets(self) -> list[int]:
            return frozen.occupied_buckets()

    chunk = chunk_starting_at(Counting(frozen), 0)
    assert (chunk.first_bucket, chunk.last_bucket, len(chunk.entries)) == (0, 65_535, 10)
    assert len(reads) <= 10
