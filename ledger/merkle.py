"""Merkle trees over transaction ids, and inclusion proofs that can be checked offline.

Leaves and inner nodes are hashed with different prefixes (as in RFC 6962) so an inner node can
never be passed off as a leaf. An odd node at the end of a level is promoted unchanged rather
than paired with a copy of itself, which avoids Bitcoin's duplicate-leaf ambiguity.
"""

from __future__ import annotations

import hashlib

EMPTY_ROOT = hashlib.sha256(b"pbft-ledger/merkle/empty").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def sized_root(tree_root: bytes, leaf_count: int) -> bytes:
    """The published root binds the leaf count: with promoted odd nodes, leaf 2 of 3 and leaf 1
    of 2 share a path, so without the count a proof could claim the wrong position."""
    return hashlib.sha256(b"\x02" + leaf_count.to_bytes(8, "big") + tree_root).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    level = [leaf_hash(leaf) for leaf in leaves]
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return sized_root(level[0], len(leaves))


def merkle_proof(leaves: list[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf `index` up to the root (levels where it was promoted skipped)."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} outside a tree of {len(leaves)}")
    level = [leaf_hash(leaf) for leaf in leaves]
    proof: list[bytes] = []
    position = index
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        position //= 2
    return proof


def merkle_paths(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and every leaf's proof (as merkle_proof gives it), the tree built once: n log n
    hashes for all of them, where n calls of merkle_proof would cost n squared."""
    if not leaves:
        return EMPTY_ROOT, []
    levels = [[leaf_hash(leaf) for leaf in leaves]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        levels.append(paired)
    paths = []
    for index in range(len(leaves)):
        path = []
        position = index
        for level in levels[:-1]:
            sibling = position ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            position //= 2
        paths.append(path)
    return sized_root(levels[-1][0], len(leaves)), paths


def root_from_proof(leaf: bytes, index: int, leaf_count: int, proof: list[bytes]) -> bytes | None:
    """The root that `proof` leads to from `leaf` at `index` of `leaf_count` leaves, or None when
    the proof has the wrong length for that position."""
    if not 0 <= index < leaf_count or leaf_count >= 1 << 32:
        return None
    current = leaf_hash(leaf)
    position = index
    width = leaf_count
    remaining = list(proof)
    while width > 1:
        sibling = position ^ 1
        if sibling < width:
            if not remaining:
                return None
            other = remaining.pop(0)
            current = node_hash(other, current) if position % 2 else node_hash(current, other)
        position //= 2
        width = (width + 1) // 2
    if remaining:
        return None
    return sized_root(current, leaf_count)


def verify_merkle_proof(leaf: bytes, index: int, leaf_count: int, proof: list[bytes], root: bytes) -> bool:
    """True only if `leaf` sits at `index` of a tree of `leaf_count` leaves with this root."""
    return root_from_proof(leaf, index, leaf_count, proof) == root
