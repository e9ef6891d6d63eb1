"""Tests of Merkle roots and inclusion proofs over transaction ids."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    merkle_paths,
    merkle_proof,
    merkle_root,
    node_hash,
    root_from_proof,
    sized_root,
    verify_merkle_proof,
)

leaf_lists = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40, unique=True)


def numbered_leaves(count: int) -> list[bytes]:
    return [hashlib.sha256(b"leaf %d" % index).digest() for index in range(count)]


def test_every_index_of_every_tree_of_1_to_40_leaves_verifies() -> None:
    for size in range(1, 41):
        leaves = numbered_leaves(size)
        root = merkle_root(leaves)
        for index in range(size):
            proof = merkle_proof(leaves, index)
            assert verify_merkle_proof(leaves[index], index, size, proof, root), (size, index)


def test_all_paths_at_once_are_the_proofs_one_by_one_for_trees_of_0_to_70_leaves() -> None:
    """merkle_paths builds the tree once (batch replies take every path of a block)."""
    for size in range(0, 71):
        leaves = numbered_leaves(size)
        root, paths = merkle_paths(leaves)
        assert root == merkle_root(leaves) and len(paths) == size
        for index in range(size):
            assert paths[index] == merkle_proof(leaves, index), (size, index)
            assert root_from_proof(leaves[index], index, size, paths[index]) == root
        if size > 1:
            assert root_from_proof(leaves[0], 0, size, paths[0][:-1]) is None  # too short
            assert root_from_proof(leaves[0], 0, size, [*paths[0], root]) is None  # too long


@given(leaves=leaf_lists, data=st.data())
@settings(derandomize=True, max_examples=150)
def test_proof_verifies_and_fails_when_anything_is_wrong(leaves: list[bytes], data: st.DataObject) -> None:
    size = len(leaves)
    root = merkle_root(leaves)
    index = data.draw(st.integers(0, size - 1), label="index")
    leaf = leaves[index]
    proof = merkle_proof(leaves, index)
    assert verify_merkle_proof(leaf, index, size, proof, root)
    assert len(proof) <= max(1, size - 1).bit_length()

    for wrong_index in range(size):
        if wrong_index != index:
            assert not verify_merkle_proof(leaf, wrong_index, size, proof, root)
    assert not verify_merkle_proof(leaf, size, size, proof, root)
    assert not verify_merkle_proof(leaf, -1, size, proof, root)

    other_leaf = data.draw(st.binary(min_size=32, max_size=32).filter(lambda value: value != leaf), label="leaf")
    assert not verify_merkle_proof(other_leaf, index, size, proof, root)

    other_root = data.draw(st.binary(min_size=32, max_size=32).filter(lambda value: value != root), label="root")
    assert not verify_merkle_proof(leaf, index, size, proof, other_root)

    assert not verify_merkle_proof(leaf, index, size, [*proof, root], root)
    if proof:
        position = data.draw(st.integers(0, len(proof) - 1), label="position")
        flip = data.draw(st.integers(1, 255), label="flip")
        tampered = [bytearray(item) for item in proof]
        tampered[position][flip % 32] ^= flip
        assert not verify_merkle_proof(leaf, index, size, [bytes(item) for item in tampered], root)
        assert not verify_merkle_proof(leaf, index, size, proof[:-1], root)
        assert not verify_merkle_proof(leaf, index, size, proof[1:], root)
        if len(proof) > 1 and proof[0] != proof[1]:
            swapped = [proof[1], proof[0], *proof[2:]]
            assert not verify_merkle_proof(leaf, index, size, swapped, root)


@given(leaves=leaf_lists, data=st.data())
@settings(derandomize=True, max_examples=60)
def test_root_changes_when_a_leaf_changes_or_leaves_are_added(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    changed = list(leaves)
    changed[index] = hashlib.sha256(leaves[index]).digest()
    assert merkle_root(changed) != root
    assert merkle_root([*leaves, leaves[-1]]) != root
    if len(leaves) > 1:
        assert merkle_root(list(reversed(leaves))) != root


def test_small_trees() -> None:
    first, second, third = numbered_leaves(3)
    assert merkle_root([]) == EMPTY_ROOT
    assert merkle_root([first]) == sized_root(leaf_hash(first), 1)
    assert merkle_proof([first], 0) == []
    assert merkle_root([first, second]) == sized_root(node_hash(leaf_hash(first), leaf_hash(second)), 2)
    # The odd leaf is promoted, not paired with a copy of itself; the root binds the leaf count.
    assert merkle_root([first, second, third]) == sized_root(
        node_hash(node_hash(leaf_hash(first), leaf_hash(second)), leaf_hash(third)), 3
    )
    assert merkle_root([first, second, third]) != merkle_root([first, second, third, third])


def test_an_inner_node_cannot_pass_as_a_leaf() -> None:
    first, second = numbered_leaves(2)
    root = merkle_root([first, second])
    inner_as_leaf = leaf_hash(first) + leaf_hash(second)
    assert merkle_root([inner_as_leaf]) != root
    assert not verify_merkle_proof(inner_as_leaf, 0, 1, [], root)


def test_proof_index_out_of_range() -> None:
    leaves = numbered_leaves(3)
    with pytest.raises(IndexError):
        merkle_proof(leaves, 3)
    with pytest.raises(IndexError):
        merkle_proof(leaves, -1)
    with pytest.raises(IndexError):
        merkle_proof([], 0)
    assert not verify_merkle_proof(leaves[0], 0, 0, [], EMPTY_ROOT)


def test_proof_verifies_only_at_its_own_index_and_leaf_count() -> None:
    leaves = numbered_leaves(3)
    root = merkle_root(leaves)
    proof = merkle_proof(leaves, 2)
    assert verify_merkle_proof(leaves[2], 2, 3, proof, root)
    assert not verify_merkle_proof(leaves[2], 1, 2, proof, root)
