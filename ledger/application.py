"""The replicated application: a deterministic state machine of accounts and a key-value namespace."""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ledger.crypto import PUBLIC_KEY_SIZE
from ledger.encoding import (
    INTEGER_MAX,
    CodecError,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.state_tree import (
    ACCOUNT,
    BUCKET_COUNT,
    VALUE,
    StateTree,
    bucket_of,
    entry_hash,
    entry_order,
    nodes_range_proof,
)
from ledger.transactions import KEY_LENGTH_MAX, Put, Transaction, TransactionResult, Transfer

# The state digest is the root of ledger/state_tree.py: entries in 65,536 buckets by a hash of
# their key, a Merkle tree over the bucket digests. It depends only on the state, not the history;
# a block's changes re-hash only the buckets they touch and those buckets' paths; and any range of
# buckets can be checked on its own against it (ledger/snapshots.py), so a snapshot served by one
# peer can be checked chunk by chunk.


# The reason recorded for a transaction whose nonce was already used: a duplicate of one that
# executed before (e.g. ordered twice across a view change). Replicas send no REPLY for it, so the
# client only ever hears about the execution that counted.
REPLAYED = "replayed:"

# The reason recorded for a transaction ordered before an earlier nonce of its sender (a traitor
# primary can order them so, or requests can simply arrive out of order). It is NOT a result: it
# did not execute, may still execute once the nonces before it have, and so replicas sign no
# REPLY for it and do not index it. Otherwise f + 1 signed "failed" replies would exist for a
# transaction that executes later, and a client retrying the "failed" payment would pay twice.
DEFERRED = "deferred:"

# The longest stored value text a store may hold (a put's own bound, VALUE_LENGTH_MAX, is lower):
# what reading the state back accepts.
STORED_TEXT_LENGTH_MAX = 1 << 16
_ROW_TYPES = frozenset({tuple, list})
_first, _second, _third = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


def is_replay(result: TransactionResult) -> bool:
    return not result.ok and result.reason.startswith(REPLAYED)


def is_deferred(result: TransactionResult) -> bool:
    return not result.ok and result.reason.startswith(DEFERRED)


def is_final(result: TransactionResult) -> bool:
    """Whether this result is the transaction's outcome for good (its nonce is now used)."""
    return not is_deferred(result)


def is_outcome(result: TransactionResult) -> bool:
    """Whether this entry is where the transaction itself was executed (ok, or failed having used
    its nonce): what a receipt may prove. Neither a deferred entry (it may still execute later)
    nor a replay (its nonce was used before, by this transaction in an earlier block or by
    another one): both record "failed" for a transaction whose real outcome is elsewhere."""
    return is_final(result) and not is_replay(result)


class Application(Protocol):
    """What the ledger needs from an application; another one can replace the default."""

    def check(self, transaction: Transaction) -> str | None:
        """A cheap pre-check before ordering: a reason to refuse now, or None."""

    def execute_block(self, transactions: list[Transaction]) -> list[TransactionResult]:
        """Apply the transactions in order; failures are results, never exceptions."""

    def state_digest(self) -> bytes: ...

    def query(self, kind: str, argument: Any) -> Any: ...

    def values_with_prefix(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, value) of the keys starting with `prefix`, in key order, produced lazily: the
        caller takes as many as its answer may hold, so the work per query stays bounded."""


@dataclass(frozen=True, slots=True)
class StateChanges:
    """Entries to write to the durable state: (account, balance, nonce) and (key, value)."""

    accounts: tuple[tuple[bytes, int, int], ...]
    values: tuple[tuple[str, str], ...]

    def __bool__(self) -> bool:
        return bool(self.accounts or self.values)


@dataclass(frozen=True, slots=True)
class Account:
    balance: int
    nonce: int


class AccountsApplication:
    """Account balances moved by transfers, plus a key-value namespace written by puts.

    A transaction executes only with the sender's next nonce, so a replayed or duplicated
    transaction can never execute twice; it is recorded as failed instead.
    """

    def __init__(self, genesis_balances: dict[bytes, int]) -> None:
        self._accounts: dict[bytes, Account] = {}
        self._values: dict[str, str] = {}
        # Every key in code-point order, for prefix reads. New keys are appended and the list is
        # re-sorted only when a prefix read comes: Timsort merges the sorted run with the short
        # new tail in about linear time, once per batch of writes rather than once per key.
        self._keys_in_order: list[str] = []
        self._keys_sorted = True
        self._tree = StateTree()
        self._frozen: list[FrozenState] = []  # views of earlier states, told of every change
        # Entries changed since the last take_changes(): what the store must write beside the
        # blocks that changed them (ledger/storage.py keeps the state durable).
        self._changed_accounts: set[bytes] = set()
        self._changed_values: set[str] = set()
        for account, balance in sorted(genesis_balances.items()):
            self._set_account(account, Account(balance, 0))

    # Entries are updated through these two methods only, so the digest can never drift from the state.
    def _set_account(self, account: bytes, new: Account) -> None:
        for view in self._frozen:
            view._remember(ACCOUNT, account, self._accounts.get(account))
        self._tree.set_account(account, new.balance, new.nonce)
        self._accounts[account] = new
        self._changed_accounts.add(account)

    def _set_value(self, key: str, value: str) -> None:
        for view in self._frozen:
            view._remember(VALUE, key, self._values.get(key))
        if key not in self._values:
            if self._keys_in_order and key < self._keys_in_order[-1]:
                self._keys_sorted = False
            self._keys_in_order.append(key)
        self._tree.set_value(key, value)
        self._values[key] = value
        self._changed_values.add(key)

    def account(self, account: bytes) -> Account:
        return self._accounts.get(account, Account(0, 0))

    def check(self, transaction: Transaction) -> str | None:
        expected = self.account(transaction.sender).nonce
        if transaction.nonce < expected:
            return f"nonce {transaction.nonce} already used (next is {expected})"
        return None

    def execute_block(self, transactions: list[Transaction]) -> list[TransactionResult]:
        return [self._execute(transaction) for transaction in transactions]

    def _execute(self, transaction: Transaction) -> TransactionResult:
        sender = self.account(transaction.sender)
        if transaction.nonce < sender.nonce:
            return TransactionResult(False, f"{REPLAYED} nonce {transaction.nonce} already used (next is {sender.nonce})")
        if transaction.nonce != sender.nonce:
            return TransactionResult(False, f"{DEFERRED} nonce {transaction.nonce} is ahead of the next nonce {sender.nonce}")
        operation = transaction.operation
        if isinstance(operation, Transfer):
            if operation.amount > sender.balance:
                self._set_account(transaction.sender, Account(sender.balance, sender.nonce + 1))
                return TransactionResult(
                    False, f"insufficient funds: balance {sender.balance}, amount {operation.amount}"
                )
            self._set_account(
                transaction.sender, Account(sender.balance - operation.amount, sender.nonce + 1)
            )
            recipient = self.account(operation.recipient)
            self._set_account(
                operation.recipient, Account(recipient.balance + operation.amount, recipient.nonce)
            )
            return TransactionResult(True)
        if isinstance(operation, Put):
            self._set_account(transaction.sender, Account(sender.balance, sender.nonce + 1))
            self._set_value(operation.key, operation.value)
            return TransactionResult(True)
        raise AssertionError(f"unknown operation {operation!r}")

    def state_digest(self) -> bytes:
        return self._tree.root()

    def bucket_entries(self, bucket: int) -> list[list[Any]]:
        """The entries of one state bucket as [namespace, key, value], in entry order (what a
        snapshot chunk carries; ledger/snapshots.py)."""
        if not 0 <= bucket < BUCKET_COUNT:
            raise ValueError(f"bucket {bucket} is not within 0..{BUCKET_COUNT - 1}")
        entries: list[list[Any]] = []
        for key in self._tree.bucket_keys(bucket):
            if isinstance(key, bytes):
                account = self._accounts[key]
                entries.append([ACCOUNT, key, [account.balance, account.nonce]])
            else:
                entries.append([VALUE, key, self._values[key]])
        return entries

    def occupied_buckets(self) -> list[int]:
        """The buckets holding entries, in order: a chunk builder skips the others (a sparse
        state has mostly empty buckets, and walking all 65,536 costs about 0.1 s)."""
        return self._tree.occupied_buckets()

    def bucket_entry_hashes(self, bucket: int) -> list[bytes]:
        """The hashes of a bucket's entries, in entry order (what a part of a bucket is checked with)."""
        if not 0 <= bucket < BUCKET_COUNT:
            raise ValueError(f"bucket {bucket} is not within 0..{BUCKET_COUNT - 1}")
        return self._tree.bucket_hashes(bucket)

    def state_range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]:
        """The Merkle proof of buckets first..last against state_digest() (ledger/state_tree.py)."""
        return self._tree.range_proof(first_bucket, last_bucket)

    def freeze(self) -> FrozenState:
        """A read-only view of the state as it is now, kept while the application moves on (a
        replica serves snapshot chunks of a checkpoint's state from it). Costs a copy of the
        tree's node list now, and afterwards one remembered old value per entry changed, until
        the view is released: release it when it is no longer wanted."""
        view = FrozenState(self, self._tree.frozen_nodes())
        self._frozen.append(view)
        return view

    def _release(self, view: FrozenState) -> None:
        if view in self._frozen:
            self._frozen.remove(view)

    def query(self, kind: str, argument: Any) -> Any:
        """Answer a read. Raises CodecError for a malformed query (the caller reports it)."""
        if kind == "account":
            account = self.account(expect_bytes(argument, "account", PUBLIC_KEY_SIZE))
            return [account.balance, account.nonce]
        if kind == "get":
            return self._values.get(expect_text(argument, "key", KEY_LENGTH_MAX))
        raise CodecError(f"query kind {kind!r} is unknown")

    def values_with_prefix(self, prefix: str) -> Iterator[tuple[str, str]]:
        if not self._keys_sorted:
            self._keys_in_order.sort()
            self._keys_sorted = True
        keys = self._keys_in_order
        for index in range(bisect.bisect_left(keys, prefix), len(keys)):
            key = keys[index]
            if not key.startswith(prefix):
                return
            yield key, self._values[key]

    def entry_count(self) -> int:
        return len(self._accounts) + len(self._values)

    def take_changes(self) -> StateChanges:
        """The entries changed since the last call (their current values), and forget them."""
        changes = StateChanges(
            tuple((key, self._accounts[key].balance, self._accounts[key].nonce) for key in sorted(self._changed_accounts)),
            tuple((key, self._values[key]) for key in sorted(self._changed_values)),
        )
        self._changed_accounts.clear()
        self._changed_values.clear()
        return changes

    @classmethod
    def from_entries(cls, accounts: Iterable[tuple[Any, Any, Any]], values: Iterable[tuple[Any, Any]]) -> AccountsApplication:
        """The application holding exactly these entries (read back from a store), nothing
        changed yet. Costs two SHA-256 per entry (its bucket and its hash) and, at the first
        state_digest(), one per non-empty bucket and tree node: linear in the state, not the history.
        Raises CodecError for an entry of the wrong shape (a damaged store).

        Entries of the right shape, each key once, take the bulk path (what a store's sorted
        rows do: about a third of the Python work per entry); anything else, entry by entry."""
        accounts, values = list(accounts), list(values)
        if _well_formed(accounts, values):
            if not _sorted_by_key(accounts, values):  # a store's rows come sorted; others may not
                accounts.sort(key=_first)
                values.sort(key=_first)
            if _sorted_by_key(accounts, values):  # else some key repeats: the last one must win
                return cls._from_sorted(accounts, values)
        application = cls({})
        for key, balance, nonce in accounts:
            application._set_account(
                expect_bytes(key, "stored account", PUBLIC_KEY_SIZE),
                Account(expect_int(balance, "stored balance"), expect_int(nonce, "stored nonce")),
            )
        for key, value in values:
            application._set_value(expect_text(key, "stored key", KEY_LENGTH_MAX), expect_text(value, "stored value", STORED_TEXT_LENGTH_MAX))
        application._changed_accounts.clear()
        application._changed_values.clear()
        return application

    @classmethod
    def _from_sorted(cls, accounts: list[tuple[bytes, int, int]], values: list[tuple[str, str]]) -> AccountsApplication:
        """from_entries for entries _well_formed found well formed and sorted by key, each key once."""
        application = cls({})
        application._accounts = {key: Account(balance, nonce) for key, balance, nonce in accounts}
        application._values = dict(values)
        application._keys_in_order = [key for key, _ in values]
        application._tree = StateTree.from_sorted(accounts, values)
        return application

    def snapshot(self) -> list[Any]:
        """The whole state as plain data, for state transfer at a checkpoint."""
        accounts = [[key, value.balance, value.nonce] for key, value in sorted(self._accounts.items())]
        values = [[key, value] for key, value in sorted(self._values.items())]
        return [accounts, values]

    @classmethod
    def from_snapshot(cls, plain: Any) -> AccountsApplication:
        accounts, values = expect_list(plain, "snapshot", length=2)
        application = cls({})
        for item in expect_list(accounts, "snapshot accounts", length_max=1 << 24):
            key, balance, nonce = expect_list(item, "snapshot account", length=3)
            application._set_account(
                expect_bytes(key, "account", PUBLIC_KEY_SIZE),
                Account(expect_int(balance, "balance"), expect_int(nonce, "nonce")),
            )
        for item in expect_list(values, "snapshot values", length_max=1 << 24):
            key, value = expect_list(item, "snapshot value", length=2)
            application._set_value(expect_text(key, "key", KEY_LENGTH_MAX), expect_text(value, "value"))
        return application


class FrozenState:
    """The state of an AccountsApplication at the moment it was frozen: its digest, and each
    bucket's entries with their range proofs (what ledger/snapshots.py builds chunks from).

    It holds the old value of every entry changed since, so answers cost the current bucket
    plus those changes; it grows with the changes until release()."""

    def __init__(self, application: AccountsApplication, nodes: list[bytes]) -> None:
        self._application: AccountsApplication | None = application
        self._nodes = nodes
        self._digest = nodes[1]
        # bucket -> {key: (namespace, the entry's value when frozen, None if it did not exist)}
        self._changed: dict[int, dict[bytes | str, tuple[str, Any]]] = {}
        self._changed_hashes: dict[int, list[bytes]] = {}  # of changed buckets, once asked for
        self.changed_entries = 0
        self._occupied: list[int] | None = None

    def _remember(self, namespace: str, key: bytes | str, old: Any) -> None:
        changed = self._changed.setdefault(bucket_of(namespace, key), {})
        if key not in changed:
            changed[key] = (namespace, old)
            self.changed_entries += 1

    def state_digest(self) -> bytes:
        return self._digest

    def occupied_buckets(self) -> list[int]:
        """A superset of the buckets holding entries when frozen, in order: entries are never
        removed, so the application's occupied buckets now (and the frozen ones' old values)
        cover them. Computed once: it does not change meaning as the application moves on."""
        if self._occupied is None:
            if self._application is None:
                raise ValueError("the frozen state was released")
            self._occupied = sorted(set(self._application.occupied_buckets()) | set(self._changed))
        return self._occupied

    def bucket_entries(self, bucket: int) -> list[list[Any]]:
        """The bucket's entries when frozen, in entry order."""
        if self._application is None:
            raise ValueError("the frozen state was released")
        current = self._application.bucket_entries(bucket)
        changed = self._changed.get(bucket)
        if not changed:
            return current
        entries = {entry[1]: entry for entry in current if entry[1] not in changed}
        for key, (namespace, old) in changed.items():
            if isinstance(old, Account):
                entries[key] = [namespace, key, [old.balance, old.nonce]]
            elif old is not None:
                entries[key] = [namespace, key, old]
        return sorted(entries.values(), key=lambda entry: entry_order(entry[0], entry[1]))

    def bucket_entry_hashes(self, bucket: int) -> list[bytes]:
        """The hashes of the bucket's entries when frozen, in entry order. A bucket changed since
        is hashed once and kept: the parts of a large bucket are each built from them."""
        if self._application is None:
            raise ValueError("the frozen state was released")
        if bucket not in self._changed:
            return self._application.bucket_entry_hashes(bucket)
        hashes = self._changed_hashes.get(bucket)
        if hashes is None:
            hashes = self._changed_hashes[bucket] = [entry_hash(*entry) for entry in self.bucket_entries(bucket)]
        return hashes

    def state_range_proof(self, first_bucket: int, last_bucket: int) -> list[bytes]:
        return nodes_range_proof(self._nodes, first_bucket, last_bucket)

    def release(self) -> None:
        """Stop following the application and drop what was kept."""
        if self._application is not None:
            self._application._release(self)
        self._application = None
        self._changed.clear()
        self._changed_hashes.clear()
        self._nodes = []


def _strictly_increasing(keys: list[Any]) -> bool:
    """Whether every key is below the next (so none repeats), compared in C."""
    return all(map(operator.lt, keys, itertools.islice(keys, 1, None)))


def _sorted_by_key(accounts: list[Any], values: list[Any]) -> bool:
    return _strictly_increasing(list(map(_first, accounts))) and _strictly_increasing(list(map(_first, values)))


def _types_within(items: list[Any], kind: type, lowest: int, highest: int) -> bool:
    """Whether every item is exactly of `kind` (no subclass, so no bool for int) and its size
    (the int itself, else its length) is within lowest..highest, checked in C."""
    if not items:
        return True
    if set(map(type, items)) != {kind}:
        return False
    sizes = items if kind is int else list(map(len, items))
    return lowest <= min(sizes) and max(sizes) <= highest


def _well_formed(accounts: list[Any], values: list[Any]) -> bool:
    """Whether every entry is what from_entries' checks accept entry by entry: rows of three
    and two items, a 32-byte account, a balance and nonce within [0, INTEGER_MAX], text keys of
    at most KEY_LENGTH_MAX characters and text values of at most STORED_TEXT_LENGTH_MAX. Every check runs
    in C over a whole column, so a restart pays a few passes over the state rather than a few
    calls per entry; an entry that fails any of them is found again, by name, entry by entry."""
    if accounts and (not set(map(type, accounts)) <= _ROW_TYPES or set(map(len, accounts)) != {3}):
        return False
    if values and (not set(map(type, values)) <= _ROW_TYPES or set(map(len, values)) != {2}):
        return False
    return (
        _types_within(list(map(_first, accounts)), bytes, PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE)
        and _types_within(list(map(_second, accounts)), int, 0, INTEGER_MAX)
        and _types_within(list(map(_third, accounts)), int, 0, INTEGER_MAX)
        and _types_within(list(map(_first, values)), str, 0, KEY_LENGTH_MAX)
        and _types_within(list(map(_second, values)), str, 0, STORED_TEXT_LENGTH_MAX)
    )
