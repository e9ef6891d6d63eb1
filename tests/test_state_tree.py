"""Tests of the bucketed Merkle state commitment: what changes the root, what does not, and range proofs."""

from __future__ import annotations

import random

from bucket_helpers import GROUND_BUCKET, GROUND_KEYS
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.application import AccountsApplication
from ledger.encoding import encode
from ledger.state_tree import (
    _TEXT_HEADS,
    ACCOUNT,
    BUCKET_COUNT,
    EMPTY_ROOT,
    PAGE_ENTRIES,
    VALUE,
    StateTree,
    bucket_digest,
    bucket_of,
    entry_hash,
    range_root,
)

ACCOUNTS = [bytes([index]) * 32 for index in range(8)]

entries_strategy = st.lists(
    st.one_of(
        st.tuples(st.just(ACCOUNT), st.sampled_from(ACCOUNTS), st.tuples(st.integers(0, 1000), st.integers(0, 5))),
        st.tuples(st.just(VALUE), st.text(max_size=6), st.text(max_size=6)),
    ),
    max_size=30,
)


def application_of(entries: list[tuple[str, object, object]]) -> AccountsApplication:
    """The application holding these entries (later writes of a key win)."""
    accounts: dict[bytes, tuple[int, int]] = {}
    values: dict[str, str] = {}
    for namespace, key, value in entries:
        if namespace == ACCOUNT:
            accounts[key] = value  # type: ignore[index,assignment]
        else:
            values[key] = value  # type: ignore[index,assignment]
    return AccountsApplication.from_entries(
        [(key, balance, nonce) for key, (balance, nonce) in accounts.items()], list(values.items())
    )


def test_an_empty_state_has_the_empty_root() -> None:
    assert StateTree().root() == EMPTY_ROOT
    assert AccountsApplication({}).state_digest() == EMPTY_ROOT


@settings(max_examples=60, deadline=None)
@given(entries_strategy, st.randoms(use_true_random=False))
def test_the_digest_does_not_depend_on_the_order_of_writes(entries: list[tuple[str, object, object]], shuffler: random.Random) -> None:
    # The last write of each key decides its value; shuffle only the order of distinct keys.
    final = {(namespace, key): value for namespace, key, value in entries}
    shuffled = list(final.items())
    shuffler.shuffle(shuffled)
    reordered = [(namespace, key, value) for (namespace, key), value in shuffled]
    assert application_of(entries).state_digest() == application_of(reordered).state_digest()


@settings(max_examples=60, deadline=None)
@given(entries_strategy, st.data())
def test_the_digest_changes_with_any_entry_change(entries: list[tuple[str, object, object]], data: st.DataObject) -> None:
    base = application_of(entries)
    final = {(namespace, key): value for namespace, key, value in entries}
    if final:
        (namespace, key), value = data.draw(st.sampled_from(sorted(final.items(), key=repr)))
        if namespace == ACCOUNT:
            balance, nonce = value  # type: ignore[misc]
            changed = (balance + 1, nonce) if data.draw(st.booleans()) else (balance, nonce + 1)
        else:
            changed = value + "x"  # type: ignore[operator]
        assert application_of([*entries, (namespace, key, changed)]).state_digest() != base.state_digest()
    added = application_of([*entries, (VALUE, "a key no strategy draws", "")])
    assert added.state_digest() != base.state_digest()


def test_two_states_differing_in_one_entry_have_different_roots() -> None:
    values = [(f"key {index}", f"value {index}") for index in range(2000)]
    first = AccountsApplication.from_entries([], values)
    for index in (0, 777, 1999):
        edited = list(values)
        edited[index] = (values[index][0], values[index][1] + "!")
        assert AccountsApplication.from_entries([], edited).state_digest() != first.state_digest()
    assert AccountsApplication.from_entries([], values[:-1]).state_digest() != first.state_digest()
    # An account and a value with the same bytes are different entries.
    key = "k" * 32
    as_value = AccountsApplication.from_entries([], [(key, "")])
    as_account = AccountsApplication.from_entries([(key.encode(), 0, 0)], [])
    assert as_value.state_digest() != as_account.state_digest()


def test_updating_in_place_gives_the_root_of_the_state_built_afresh() -> None:
    tree = StateTree()
    state: dict[tuple[str, str], str] = {}
    generator = random.Random(7)
    for round_ in range(20):
        for _ in range(50):
            key = f"key {generator.randrange(300)}"
            state[(VALUE, key)] = f"value {round_}"
            tree.set(VALUE, key, state[(VALUE, key)])
        rebuilt = StateTree()
        for (namespace, key), value in state.items():
            rebuilt.set(namespace, key, value)
        assert tree.root() == rebuilt.root()


def test_a_range_proof_leads_every_range_of_buckets_to_the_root() -> None:
    tree = StateTree()
    contents: dict[int, list[tuple[str, str]]] = {}
    for index in range(500):
        key = f"key {index}"
        tree.set(VALUE, key, "v")
        contents.setdefault(bucket_of(VALUE, key), []).append((key, "v"))
    root = tree.root()

    def digest(bucket: int) -> bytes:
        return bucket_digest([entry_hash(VALUE, key, value) for key, value in sorted(contents.get(bucket, []))])

    generator = random.Random(3)
    ranges = [(0, BUCKET_COUNT - 1), (0, 0), (BUCKET_COUNT - 1, BUCKET_COUNT - 1), (1, 2), (0, 1)]
    ranges += [tuple(sorted((generator.randrange(BUCKET_COUNT), generator.randrange(BUCKET_COUNT)))) for _ in range(20)]
    for first, last in ranges:
        if last - first > 5000 and (first, last) != (0, BUCKET_COUNT - 1):
            last = first + 5000
        digests = [digest(bucket) for bucket in range(first, last + 1)]
        proof = tree.range_proof(first, last)
        assert len(proof) <= 32
        assert range_root(digests, first, proof) == root
        # One sibling short, one too many, or the range shifted by one bucket: refused.
        if proof:
            assert range_root(digests, first, proof[:-1]) != root
        assert range_root(digests, first, [*proof, bytes(32)]) != root
        shifted = [digest(bucket) for bucket in range(first + 1, last + 2)]
        if last + 1 < BUCKET_COUNT and shifted != digests:
            assert range_root(digests, first + 1, tree.range_proof(first + 1, last + 1)) != root


def test_a_bulk_build_and_small_updates_reach_the_same_root() -> None:
    """Many changed buckets at once re-hash the whole tree; few walk their paths: both agree."""
    entries = [(f"key {index}", f"value {index}") for index in range(12_000)]
    bulk = StateTree()
    for key, value in entries:
        bulk.set(VALUE, key, value)
    stepwise = StateTree()
    for start in range(0, len(entries), 1000):
        for key, value in entries[start:start + 1000]:
            stepwise.set(VALUE, key, value)
        stepwise.root()
    assert bulk.root() == stepwise.root()
    assert bulk.range_proof(100, 5000) == stepwise.range_proof(100, 5000)


def keys_in_bucket(bucket: int, count: int) -> list[bytes]:
    """Account keys ground into one bucket, as a client can (about 65,536 hashes a key)."""
    found: list[bytes] = []
    candidate = 0
    while len(found) < count:
        key = candidate.to_bytes(32, "big")
        if bucket_of(ACCOUNT, key) == bucket:
            found.append(key)
        candidate += 1
    return found


def test_a_ground_bucket_keeps_entry_order_whatever_the_order_of_writes() -> None:
    bucket = bucket_of(VALUE, "b")
    value_keys = [key for key in (f"{index}" for index in range(400_000)) if bucket_of(VALUE, key) == bucket][:2]
    account_keys = keys_in_bucket(bucket, 2)
    writes = [(ACCOUNT, key, [1, 0]) for key in account_keys] + [(VALUE, key, "v") for key in ["b", *value_keys]]
    roots = set()
    generator = random.Random(5)
    for _ in range(6):
        generator.shuffle(writes)
        tree = StateTree()
        for namespace, key, value in writes:
            tree.set(namespace, key, value)
        assert tree.bucket_keys(bucket) == [*sorted(account_keys), *sorted(["b", *value_keys])]
        roots.add(tree.root())
    assert len(roots) == 1


def _stepwise(accounts: list[tuple[bytes, int, int]], values: list[tuple[str, str]]) -> StateTree:
    tree = StateTree()
    for key, balance, nonce in accounts:
        tree.set(ACCOUNT, key, [balance, nonce])
    for key, value in values:
        tree.set(VALUE, key, value)
    return tree


# Keys and values of every CBOR text head width (1, 2 and 3 bytes), past the looked-up heads
# (over 1024 bytes), and of several UTF-8 widths; balances up to INTEGER_MAX.
text_strategy = st.one_of(st.text(max_size=30), st.text(min_size=20, max_size=300), st.just("é" * 300), st.just("v" * 70_000))
account_strategy = st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))


@settings(max_examples=80, deadline=None)
@given(st.lists(account_strategy, max_size=20), st.lists(st.tuples(st.text(max_size=256), text_strategy), max_size=20))
def test_the_bulk_load_builds_the_tree_of_entry_by_entry_writes(
    accounts: list[tuple[bytes, int, int]], values: list[tuple[str, str]]
) -> None:
    accounts = sorted({key: (key, balance, nonce) for key, balance, nonce in accounts}.values())
    values = sorted(dict(values).items())
    bulk, stepwise = StateTree.from_sorted(accounts, values), _stepwise(accounts, values)
    assert bulk.root() == stepwise.root()
    for bucket in {bucket_of(ACCOUNT, key) for key, _, _ in accounts} | {bucket_of(VALUE, key) for key, _ in values}:
        assert bulk.bucket_keys(bucket) == stepwise.bucket_keys(bucket)
        assert bulk.bucket_hashes(bucket) == stepwise.bucket_hashes(bucket)
    # Both go on changing alike.
    bulk.set(VALUE, "later", "x")
    stepwise.set(VALUE, "later", "x")
    assert bulk.root() == stepwise.root()


def test_the_bulk_load_keeps_a_ground_bucket_in_entry_order_and_paged() -> None:
    account_keys = keys_in_bucket(GROUND_BUCKET, 2)
    accounts = [(key, 5, 1) for key in account_keys]
    values = sorted([(key, "v") for key in GROUND_KEYS] + [(f"other {index}", "w") for index in range(500)])
    bulk, stepwise = StateTree.from_sorted(accounts, values), _stepwise(accounts, values)
    assert bulk.bucket_keys(GROUND_BUCKET) == stepwise.bucket_keys(GROUND_BUCKET) == [*account_keys, *sorted(GROUND_KEYS)]
    assert len(bulk.bucket_keys(GROUND_BUCKET)) > PAGE_ENTRIES  # the paged digest
    assert bulk.root() == stepwise.root()


def test_the_bulk_load_of_a_large_state_builds_the_same_tree() -> None:
    """Past BUCKET_COUNT entries the load appends to a list per bucket, and hashes in runs:
    a state of several runs, in both namespaces, gives the tree of entry-by-entry writes."""
    accounts = [(index.to_bytes(32, "big"), index, index % 7) for index in range(20_000)]
    values = sorted((f"key {index}", f"value {index % 13}") for index in range(50_000))
    bulk, stepwise = StateTree.from_sorted(accounts, values), _stepwise(accounts, values)
    assert bulk.root() == stepwise.root()
    assert bulk.range_proof(0, 10) == stepwise.range_proof(0, 10)
    for bucket in range(0, BUCKET_COUNT, 997):
        assert bulk.bucket_keys(bucket) == stepwise.bucket_keys(bucket)
        assert bulk.bucket_hashes(bucket) == stepwise.bucket_hashes(bucket)


def test_the_looked_up_text_heads_are_the_canonical_encodings() -> None:
    for length in range(len(_TEXT_HEADS)):
        assert _TEXT_HEADS[length] + b"x" * length == encode("x" * length)
