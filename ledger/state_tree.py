"""The state commitment: entries bucketed by a hash of their key, a Merkle tree over the bucket digests.

Why not a multiset hash (AdHash, LtHash): its sum can be checked only for the whole state, and
since whoever serves a snapshot chooses its entries, a generalized birthday search (Wagner's
k-sum) finds another multiset with the same 1024-bit sum in about 2**64 work. Here every digest
is SHA-256 over an unambiguous encoding, so two states with one root are a SHA-256 collision,
and any contiguous range of buckets can be checked on its own against the root
(ledger/snapshots.py).

Layout: an entry (namespace, key, value) goes to bucket `bucket_of(namespace, key)`, the first
16 bits of a hash of its namespace and key (65,536 buckets). A bucket's digest is SHA-256 over
its entries' hashes in entry order (accounts by key bytes, then values by key code points); an
empty bucket's digest is the same formula over nothing, a constant. The root is a complete
binary Merkle tree of depth 16 over the bucket digests, leaves and inner nodes hashed with
different prefixes as in ledger/merkle.py. Changing entries re-hashes only their buckets and
those buckets' 16-node paths to the root (paths shared near the root are hashed once).

What bounds a bucket: nothing but the state itself. Keys are uniform under the hash, so a bucket
holds about entries / 65,536; but a client chooses its keys and can grind about 65,536 hashes per
key to land them in one bucket, each one still costing a committed transaction. So a bucket of
more than PAGE_ENTRIES (32) entries has a digest a snapshot can check in parts: its entries'
hashes are cut into pages of 32, and its digest is over its entry count and the root of a Merkle
tree over the pages' digests (a page digest is the formula of a small bucket's digest). A part
of a bucket (any run of its entries) is then checked with the hashes of the other entries on its
edge pages and the page tree's siblings along its edges (ledger/snapshots.py): a bucket of any
size is sent in chunks of bounded bytes. Buckets of 32 entries or fewer, every bucket of a state
under about a million entries, keep the one-pass digest. What a ground bucket costs: a block
touching it re-hashes it in one pass plus one hash per page (a few ms at 100,000 entries).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ledger.encoding import array_head, encode, encode_unsigned

BUCKET_BITS = 16
BUCKET_COUNT = 1 << BUCKET_BITS

ACCOUNT = "account"
VALUE = "value"

_BUCKET_TAG = b"pbft-ledger/state/bucket\x00"
_ENTRY_TAG = b"pbft-ledger/state/entry\x00"
_BUCKET_DIGEST_TAG = b"\x03"  # a small bucket's digest, and a page's
_PAGED_BUCKET_DIGEST_TAG = b"\x04"
_PAGE_NODE_TAG = b"\x05"
_PAGE_PADDING = hashlib.sha256(b"pbft-ledger/state/no page").digest()  # the page tree's leaves past the last page
PAGE_ENTRIES = 32
_LEAF_TAG = b"\x00"
_NODE_TAG = b"\x01"


def key_bytes(namespace: str, key: bytes | str) -> bytes:
    """The bytes an entry's bucket is derived from: injective, since no namespace holds a NUL."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8")
    return namespace.encode("ascii") + b"\x00" + raw


def bucket_of(namespace: str, key: bytes | str) -> int:
    return int.from_bytes(hashlib.sha256(_BUCKET_TAG + key_bytes(namespace, key)).digest()[:2], "big")


def entry_hash(namespace: str, key: bytes | str, value: Any) -> bytes:
    """The hash of one entry; `value` is [balance, nonce] for an account, the text for a value."""
    return entry_hash_of_encoded(encode([namespace, key, value]))


def account_entry_hash(account: bytes, balance: int, nonce: int) -> bytes:
    """entry_hash(ACCOUNT, account, [balance, nonce]), the encoding assembled: a block re-hashes
    every account it touches."""
    if len(account) != 32 or type(balance) is not int or type(nonce) is not int or not (0 <= balance < 1 << 64 and 0 <= nonce < 1 << 64):
        return entry_hash(ACCOUNT, account, [balance, nonce])
    return hashlib.sha256(_ACCOUNT_ENTRY_PREFIX + account + _TWO_ITEMS + encode_unsigned(balance) + encode_unsigned(nonce)).digest()


def value_entry_hash(key: str, value: str) -> bytes:
    """entry_hash(VALUE, key, value), the encoding assembled (see account_entry_hash)."""
    raw_key, raw_value = key.encode("utf-8"), value.encode("utf-8")
    heads = _TEXT_HEADS
    if len(raw_key) >= len(heads) or len(raw_value) >= len(heads):
        return entry_hash(VALUE, key, value)
    return hashlib.sha256(_VALUE_ENTRY_PREFIX + heads[len(raw_key)] + raw_key + heads[len(raw_value)] + raw_value).digest()


def entry_hash_of_encoded(encoded: bytes) -> bytes:
    """The hash of one entry from its canonical encoding encode([namespace, key, value])."""
    return hashlib.sha256(_ENTRY_TAG + encoded).digest()


def _buckets(namespace: str, raw_keys: list[bytes]) -> list[int]:
    """bucket_of for many keys of one namespace, given their raw bytes."""
    prefix = _BUCKET_TAG + key_bytes(namespace, b"")
    sha256, from_bytes = hashlib.sha256, int.from_bytes
    return [from_bytes(sha256(prefix + raw).digest()[:2], "big") for raw in raw_keys]


def _entry_hashes(namespace: str, encoded_keys_and_values: list[bytes]) -> list[bytes]:
    """entry_hash for many entries of one namespace, given encode(key) + encode(value) of each:
    the canonical encoding of the array [namespace, key, value] is its head, then its items'."""
    prefix = _ENTRY_TAG + array_head(3) + encode(namespace)
    sha256 = hashlib.sha256
    return [sha256(prefix + encoded).digest() for encoded in encoded_keys_and_values]


# The canonical CBOR heads of text strings by their length in bytes, for the lengths a key can take.
_TEXT_HEADS = [encode("x" * length)[:-length or None] for length in range(4 * 256 + 1)]


def _encoded_texts(first: list[bytes], second: list[bytes]) -> list[bytes]:
    """encode(a) + encode(b) for each pair of texts given as UTF-8 (what a value entry's
    hash is over, after its namespace): the head is looked up, not encoded, when both are short."""
    heads = _TEXT_HEADS
    if max(map(len, first), default=0) < len(heads) and max(map(len, second), default=0) < len(heads):
        return [heads[len(a)] + a + heads[len(b)] + b for a, b in zip(first, second, strict=True)]
    return [encode(a.decode("utf-8")) + encode(b.decode("utf-8")) for a, b in zip(first, second, strict=True)]


_ACCOUNT_ENTRY_PREFIX = _ENTRY_TAG + array_head(3) + encode(ACCOUNT) + encode(bytes(32))[:2]  # then the 32 key bytes
_VALUE_ENTRY_PREFIX = _ENTRY_TAG + array_head(3) + encode(VALUE)
_TWO_ITEMS = array_head(2)

# Keys whose bucket a tree remembers, per namespace, at most (then it forgets them all): a
# bucket costs a SHA-256 to find, and the keys a block touches are mostly ones touched before.
BUCKET_MEMO_MAX = 1 << 15


def entry_order(namespace: str, key: bytes | str) -> tuple[int, bytes | str]:
    """The sort key of entries within a bucket: namespace first, then the key's own order."""
    return (0 if namespace == ACCOUNT else 1, key)


def bucket_digest(entry_hashes: list[bytes]) -> bytes:
    """The digest of a bucket from its entries' hashes, already in entry order: one pass over
    them up to PAGE_ENTRIES, else over the entry count and the page tree's root."""
    if len(entry_hashes) <= PAGE_ENTRIES:
        return page_digest(entry_hashes)
    return paged_bucket_digest(len(entry_hashes), page_tree_root(page_digests(entry_hashes)))


def page_digest(entry_hashes: list[bytes]) -> bytes:
    return hashlib.sha256(_BUCKET_DIGEST_TAG + b"".join(entry_hashes)).digest()


def page_digests(entry_hashes: list[bytes]) -> list[bytes]:
    """The digests of a bucket's pages: its entry hashes cut into runs of PAGE_ENTRIES."""
    return [page_digest(entry_hashes[start:start + PAGE_ENTRIES]) for start in range(0, len(entry_hashes), PAGE_ENTRIES)]


def paged_bucket_digest(entry_count: int, page_root: bytes) -> bytes:
    """The digest of a bucket of more than PAGE_ENTRIES entries: the count fixes the page tree's
    shape, so a part cannot claim another position in it."""
    return hashlib.sha256(_PAGED_BUCKET_DIGEST_TAG + entry_count.to_bytes(8, "big") + page_root).digest()


def page_tree_depth(page_count: int) -> int:
    """The depth of the complete binary tree over this many pages (padded up to a power of two)."""
    return max(0, page_count - 1).bit_length()


def _page_parents(level: list[bytes]) -> list[bytes]:
    sha256 = hashlib.sha256
    return [sha256(_PAGE_NODE_TAG + left + right).digest() for left, right in zip(level[::2], level[1::2], strict=True)]


def page_tree_levels(digests: list[bytes]) -> list[list[bytes]]:
    """The page tree, leaves first (padded to a power of two), root last."""
    level = digests + [_PAGE_PADDING] * ((1 << page_tree_depth(len(digests))) - len(digests))
    levels = [level]
    while len(level) > 1:
        level = _page_parents(level)
        levels.append(level)
    return levels


def page_tree_root(digests: list[bytes]) -> bytes:
    return page_tree_levels(digests)[-1][0]


def page_range_proof(digests: list[bytes], first_page: int, last_page: int) -> list[bytes]:
    """The siblings that lead pages first..last (inclusive) to the page tree's root: at each
    level from the leaves up, the left neighbour of the range if it has one, then the right one."""
    if not 0 <= first_page <= last_page < len(digests):
        raise ValueError(f"page range {first_page}..{last_page} is not within 0..{len(digests) - 1}")
    proof: list[bytes] = []
    low, high = first_page, last_page
    for level in page_tree_levels(digests)[:-1]:
        if low & 1:
            proof.append(level[low - 1])
        if not high & 1:
            proof.append(level[high + 1])
        low, high = low >> 1, high >> 1
    return proof


def page_range_root(digests: list[bytes], first_page: int, page_count: int, proof: list[bytes]) -> bytes | None:
    """The page tree root that these consecutive page digests (from `first_page`, of a bucket of
    `page_count` pages) and `proof` lead to, or None if the proof is not exactly as long as the
    range needs."""
    last_page = first_page + len(digests) - 1
    if not digests or not 0 <= first_page <= last_page < page_count:
        return None
    return fold_range_proof(list(digests), first_page, last_page, proof, page_tree_depth(page_count), lambda level, _: _page_parents(level))


def fold_range_proof(
    level: list[bytes], low: int, high: int, proof: list[bytes], rounds: int, parents: Callable[[list[bytes], int], list[bytes]]
) -> bytes | None:
    """Climb a binary tree from the consecutive nodes `level` (positions low..high), taking each
    round's missing left and right siblings from `proof` in order; `parents(level, round)` hashes a
    level's pairs. The root, or None unless the proof is used exactly."""
    remaining = iter(proof)
    used = 0
    for round_index in range(rounds):
        if low & 1:
            sibling = next(remaining, None)
            if sibling is None:
                return None
            level.insert(0, sibling)
            used += 1
        if not high & 1:
            sibling = next(remaining, None)
            if sibling is None:
                return None
            level.append(sibling)
            used += 1
        level = parents(level, round_index)
        low, high = low >> 1, high >> 1
    return level[0] if used == len(proof) else None


def leaf_hash(digest: bytes) -> bytes:
    return hashlib.sha256(_LEAF_TAG + digest).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_TAG + left + right).digest()


EMPTY_BUCKET_DIGEST = bucket_digest([])


def _empty_subtree_hashes() -> list[bytes]:
    """The hash of an all-empty subtree at each depth: index 0 the root, index 16 a leaf."""
    hashes = [leaf_hash(EMPTY_BUCKET_DIGEST)]
    for _ in range(BUCKET_BITS):
        hashes.append(node_hash(hashes[-1], hashes[-1]))
    return hashes[::-1]


# Node i of the tree sits at depth i.bit_length() - 1: the root is node 1, bucket b is node BUCKET_COUNT + b.
EMPTY_SUBTREE = _empty_subtree_hashes()
EMPTY_ROOT = EMPTY_SUBTREE[0]


def _empty_tree() -> list[bytes]:
    nodes = [b""]  # index 0 is unused: node i has children 2i and 2i + 1
    for depth, empty in enumerate(EMPTY_SUBTREE):
        nodes.extend([empty] * (1 << depth))
    return nodes


# Entries StateTree.from_sorted hashes at a time.
_LOAD_RUN = 1 << 14

# Past this many changed buckets, re-hashing every node level by level beats walking the paths.
_FULL_REBUILD_BUCKETS = BUCKET_COUNT // 16


class StateTree:
    """The commitment over a changing set of entries.

    Memory: one 32-byte entry hash and two list slots per entry (the entries themselves are
    the application's), the hashes of the non-empty tree nodes, and a 2 * 65,536-slot list of
    references to them."""

    def __init__(self) -> None:
        # bucket -> its keys in entry order, and their entries' hashes in the same order: kept
        # sorted as keys arrive, so a bucket a client grew by grinding keys into it costs one
        # binary search to change and one pass to re-hash, never a sort. Keys of the two
        # namespaces never compare equal (bytes against text).
        self._keys: dict[int, list[bytes | str]] = {}
        self._hashes: dict[int, list[bytes]] = {}
        self._nodes = _empty_tree()
        self._dirty: set[int] = set()
        # bucket_of of recently set keys, per namespace (bounded: BUCKET_MEMO_MAX).
        self._buckets_memo: dict[str, dict[bytes | str, int]] = {ACCOUNT: {}, VALUE: {}}

    def set(self, namespace: str, key: bytes | str, value: Any) -> None:
        self._set_hash(namespace, key, entry_hash(namespace, key, value))

    def set_account(self, account: bytes, balance: int, nonce: int) -> None:
        """set(ACCOUNT, account, [balance, nonce]), the entry hashed from its assembled encoding."""
        self._set_hash(ACCOUNT, account, account_entry_hash(account, balance, nonce))

    def set_value(self, key: str, value: str) -> None:
        """set(VALUE, key, value), the entry hashed from its assembled encoding."""
        self._set_hash(VALUE, key, value_entry_hash(key, value))

    def _set_hash(self, namespace: str, key: bytes | str, hashed: bytes) -> None:
        memo = self._buckets_memo.get(namespace)
        bucket = None if memo is None else memo.get(key)
        remember = bucket is None and memo is not None
        if bucket is None:
            bucket = bucket_of(namespace, key)
        keys = self._keys.get(bucket)
        if keys is None:
            keys = self._keys[bucket] = []
            self._hashes[bucket] = []
        hashes = self._hashes[bucket]
        if len(keys) == 1 and keys[0] == key:  # most buckets hold one entry
            index = 0
            hashes[0] = hashed
        else:
            index = bisect.bisect_left(keys, _key_order(key), key=_key_order)
            if index < len(keys) and keys[index] == key:
                hashes[index] = hashed
            else:
                keys.insert(index, key)
                hashes.insert(index, hashed)
        if remember:
            if len(memo) >= BUCKET_MEMO_MAX:  # type: ignore[arg-type]
                memo.clear()  # type: ignore[union-attr]
            # The tree's own key object, not the caller's equal copy: the memo holds no second
            # copy of a key (found by an adversarial review: re-puts of long keys kept 38 MiB).
            memo[keys[index]] = bucket  # type: ignore[index]
        self._dirty.add(bucket)

    @classmethod
    def from_sorted(cls, accounts: list[tuple[bytes, int, int]], values: list[tuple[str, str]]) -> StateTree:
        """The tree set() would build from these entries, built in one pass (a restart's load):
        every entry hashed twice from precomputed prefixes in one comprehension each, then
        appended to its bucket, instead of a bisect and eight Python calls per entry; the tree
        is hashed once, at the first root(). The caller guarantees accounts in key order and
        values in key order, each key once: then appending keeps every bucket in entry order
        (accounts, then values, each sorted)."""
        tree = cls()
        # A list per bucket is the faster to append to once most buckets hold entries (measured:
        # from about BUCKET_COUNT entries), but costs 131,072 lists however few the entries.
        small = len(accounts) + len(values) < BUCKET_COUNT
        keys_of: Any = defaultdict(list) if small else [[] for _ in range(BUCKET_COUNT)]
        hashes_of: Any = defaultdict(list) if small else [[] for _ in range(BUCKET_COUNT)]
        # In runs of _LOAD_RUN entries, so what is held beside the entries (their bytes, encodings
        # and bucket numbers before they are grouped) stays bounded whatever the state's size.
        for start in range(0, len(accounts), _LOAD_RUN):
            run = accounts[start:start + _LOAD_RUN]
            keys = [key for key, _, _ in run]
            encoded = [encode(key) + encode([balance, nonce]) for key, balance, nonce in run]
            for bucket, key, hashed in zip(_buckets(ACCOUNT, keys), keys, _entry_hashes(ACCOUNT, encoded), strict=True):
                keys_of[bucket].append(key)
                hashes_of[bucket].append(hashed)
        for start in range(0, len(values), _LOAD_RUN):
            run = values[start:start + _LOAD_RUN]
            keys = [key for key, _ in run]
            raw_keys = [key.encode("utf-8") for key in keys]
            encoded = _encoded_texts(raw_keys, [value.encode("utf-8") for _, value in run])
            for bucket, key, hashed in zip(_buckets(VALUE, raw_keys), keys, _entry_hashes(VALUE, encoded), strict=True):
                keys_of[bucket].append(key)
                hashes_of[bucket].append(hashed)
        tree._keys = {bucket: keys for bucket, keys in (keys_of.items() if small else enumerate(keys_of)) if keys}
        tree._hashes = {bucket: hashes_of[bucket] for bucket in tree._keys}
        tree._dirty = set(tree._keys)
        return tree

    def bucket_keys(self, bucket: int) -> list[bytes | str]:
        """The keys in a bucket, in entry order."""
        return list(self._keys.get(bucket, ()))

    def occupied_buckets(self) -> list[int]:
        """The buckets holding at least one entry, in order (entries are never removed)."""
        return sorted(bucket for bucket, keys in self._keys.items() if keys)

    def bucket_hashes(self, bucket: int) -> list[bytes]:
        """The hashes of a bucket's entries, in entry order."""
        return list(self._hashes.get(bucket, ()))

    def _refresh(self) -> None:
        """Re-hash the buckets changed since the last call, then their paths, level by level."""
        if not self._dirty:
            return
        nodes, hashes_of = self._nodes, self._hashes
        sha256 = hashlib.sha256
        # bucket_digest and leaf_hash inlined for small buckets: a restart hashes every bucket here.
        for bucket in self._dirty:
            hashes = hashes_of[bucket]
            digest = sha256(_BUCKET_DIGEST_TAG + b"".join(hashes)).digest() if len(hashes) <= PAGE_ENTRIES else bucket_digest(hashes)
            nodes[BUCKET_COUNT + bucket] = sha256(_LEAF_TAG + digest).digest()
        if len(self._dirty) > _FULL_REBUILD_BUCKETS:
            for depth in range(BUCKET_BITS - 1, -1, -1):
                low, high = 1 << depth, 2 << depth
                nodes[low:high] = _parents(nodes[2 * low:2 * high], depth)
        else:
            node_tag = _NODE_TAG
            level = {(BUCKET_COUNT + bucket) >> 1 for bucket in self._dirty}
            while level:
                for index in level:
                    left = index << 1
                    nodes[index] = sha256(node_tag + nodes[left] + nodes[left | 1]).digest()
                level = {index >> 1 for index in level if index > 1}
        self._dirty.clear()

    def root(self) -> bytes:
        self._refresh()
        return self._nodes[1]

    def range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]:
        """The sibling hashes that lead buckets first..last (inclusive) to the root."""
        self._refresh()
        return nodes_range_proof(self._nodes, first_bucket, last_bucket)

    def frozen_nodes(self) -> list[bytes]:
        """A copy of the tree as it is now (2 * 65,536 references, the hashes shared): what
        range proofs of this state are taken from after the tree has moved on."""
        self._refresh()
        return list(self._nodes)


def nodes_range_proof(nodes: list[bytes], first_bucket: int, last_bucket: int) -> list[bytes]:
    """The range proof in a tree's nodes: at each level from the leaves up, the left neighbour
    of the range if it has one, then the right one."""
    if not 0 <= first_bucket <= last_bucket < BUCKET_COUNT:
        raise ValueError(f"bucket range {first_bucket}..{last_bucket} is not within 0..{BUCKET_COUNT - 1}")
    proof: list[bytes] = []
    low, high = BUCKET_COUNT + first_bucket, BUCKET_COUNT + last_bucket
    while low > 1:
        if low & 1:
            proof.append(nodes[low - 1])
        if not high & 1:
            proof.append(nodes[high + 1])
        low, high = low >> 1, high >> 1
    return proof


def _parents(children: list[bytes], depth: int) -> list[bytes]:
    """The nodes at `depth` over their children (an even count, in order); a pair of empty
    subtrees has the empty subtree's hash, found without hashing."""
    empty_child, empty_parent = EMPTY_SUBTREE[depth + 1], EMPTY_SUBTREE[depth]
    sha256 = hashlib.sha256
    return [
        empty_parent if left == empty_child == right else sha256(_NODE_TAG + left + right).digest()
        for left, right in zip(children[::2], children[1::2], strict=True)
    ]


def _key_order(key: bytes | str) -> tuple[bool, bytes | str]:
    """entry_order for the keys a tree holds: account keys are bytes, value keys text."""
    return (isinstance(key, str), key)


def range_root(bucket_digests: list[bytes], first_bucket: int, proof: list[bytes]) -> bytes | None:
    """The root that these consecutive bucket digests (from `first_bucket`) and `proof` lead to,
    or None if the proof is not exactly as long as the range needs."""
    last_bucket = first_bucket + len(bucket_digests) - 1
    if not bucket_digests or not 0 <= first_bucket <= last_bucket < BUCKET_COUNT:
        return None
    empty_leaf = EMPTY_SUBTREE[BUCKET_BITS]
    level = [empty_leaf if digest == EMPTY_BUCKET_DIGEST else leaf_hash(digest) for digest in bucket_digests]
    # Heap positions: the leaves are BUCKET_COUNT.., and round r makes the nodes at depth BUCKET_BITS - 1 - r.
    return fold_range_proof(
        level, BUCKET_COUNT + first_bucket, BUCKET_COUNT + last_bucket, proof, BUCKET_BITS,
        lambda nodes, round_index: _parents(nodes, BUCKET_BITS - 1 - round_index),
    )
