"""The state tree's assembled entry hashes and its bucket memo: the same hashes and roots as the
generic encoding and a fresh tree, whatever the sizes and however many keys pass through the memo."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger.state_tree as state_tree
from ledger.encoding import CodecError, encode, encode_unsigned
from ledger.state_tree import (
    ACCOUNT,
    VALUE,
    StateTree,
    account_entry_hash,
    bucket_of,
    entry_hash,
    value_entry_hash,
)

# Either side of the CBOR head boundaries, and of the text-head table (1,024 bytes).
sizes = st.sampled_from([0, 1, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 2**64])


@given(account=st.binary(min_size=31, max_size=33), balance=sizes, nonce=sizes)
@settings(derandomize=True, max_examples=120)
def test_an_account_entry_hash_is_the_generic_one(account: bytes, balance: int, nonce: int) -> None:
    assert account_entry_hash(account, balance, nonce) == entry_hash(ACCOUNT, account, [balance, nonce])


@given(key=st.text(min_size=1, max_size=300) | st.sampled_from(["k" * 1024, "é" * 512, "k" * 1025]), value=st.text(max_size=40) | st.sampled_from(["v" * 1023, "v" * 1024, "v" * 5000]))
@settings(derandomize=True, max_examples=120)
def test_a_value_entry_hash_is_the_generic_one(key: str, value: str) -> None:
    assert value_entry_hash(key, value) == entry_hash(VALUE, key, value)


def test_the_bucket_memo_stays_bounded_and_never_changes_a_root(monkeypatch: object) -> None:
    monkeypatch.setattr(state_tree, "BUCKET_MEMO_MAX", 8)  # type: ignore[attr-defined]
    tree, reference = StateTree(), StateTree()
    accounts = [hashlib.sha256(bytes([index])).digest() for index in range(40)]
    for round_index in range(3):  # keys seen again after the memo forgot them
        for index, account in enumerate(accounts):
            tree.set_account(account, round_index, index)
            tree.set_value(f"key-{index}", f"{round_index}")
            reference._set_hash(ACCOUNT, account, entry_hash(ACCOUNT, account, [round_index, index]))
            reference._set_hash(VALUE, f"key-{index}", entry_hash(VALUE, f"key-{index}", f"{round_index}"))
            assert all(len(memo) <= 8 for memo in tree._buckets_memo.values())
        assert tree.root() == reference.root()
    for memo in tree._buckets_memo.values():
        assert all(bucket == bucket_of(ACCOUNT if isinstance(key, bytes) else VALUE, key) for key, bucket in memo.items())
    plain = StateTree()
    for index, account in enumerate(accounts):
        plain.set(ACCOUNT, account, [2, index])
        plain.set(VALUE, f"key-{index}", "2")
    assert plain.root() == tree.root()


def test_the_bucket_memo_holds_the_trees_own_key_object_not_the_callers_copy() -> None:
    """Re-setting an existing key after the memo forgot it stores the key object the tree holds,
    so a flood of re-puts of long keys keeps no second copy of each (an adversarial review found
    38 MiB kept by 32,768 re-puts of 256-character keys)."""
    tree = StateTree()
    original = "k" * 256
    tree.set(VALUE, original, "v")
    tree._buckets_memo[VALUE].clear()
    copy = "".join(["k"] * 256)
    assert copy == original and copy is not original
    tree.set(VALUE, copy, "w")
    (remembered,) = tree._buckets_memo[VALUE]
    assert remembered is original


def test_encode_unsigned_refuses_what_has_another_encoding() -> None:
    for value in (-1, -25, True, 1.0):
        with pytest.raises(CodecError):
            encode_unsigned(value)  # type: ignore[arg-type]
    assert encode_unsigned(23) == encode(23) and encode_unsigned(2**64 - 1) == encode(2**64 - 1)
