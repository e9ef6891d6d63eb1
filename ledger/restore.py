"""A replica's application state at start, from its store: the durable state checked against the chain and only later blocks re-executed; and the full audit from genesis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledger.application import AccountsApplication, StateChanges, is_final, is_replay
from ledger.blocks import Block, ChainError, verify_certificate, verify_execution
from ledger.config import NetworkConfig
from ledger.crypto import signing_domain, verify_signature
from ledger.encoding import CodecError
from ledger.messages import CheckpointCertificate, checkpoint_certificate_signers_problem
from ledger.storage import BlockStore, StoreError

# Commit certificates checked on every open, counted back from the tip (each costs a quorum of
# Ed25519 verifications, about 0.1 ms each): the tip cannot be replaced by a block no quorum committed.
RECENT_CERTIFICATES_CHECKED = 4


@dataclass(frozen=True)
class Restored:
    """What a start found: the application at the tip, and what it took to get there."""

    application: AccountsApplication
    latest_timestamp_ms: int  # the latest block timestamp: new proposals must not go back before it
    state_height: int | None  # the height of the durable state read, None if there was none
    blocks_replayed: int  # blocks re-executed because the durable state was behind the tip
    state_entries: int


def _check_recent_certificates(store: BlockStore, network: NetworkConfig) -> None:
    for block in store.blocks(max(1, store.height - RECENT_CERTIFICATES_CHECKED + 1), RECENT_CERTIFICATES_CHECKED):
        try:
            verify_certificate(block.header, block.certificate, network.identity, network.replica_keys, network.quorum)
        except ChainError as error:
            raise StoreError(f"{store.path}: store fails verification: {error}") from None


def _stored_application(store: BlockStore, accounts: Any, values: Any, digest: bytes) -> AccountsApplication:
    """The application of the stored state rows, which must have the stored digest. Raises StoreError."""
    try:
        application = AccountsApplication.from_entries(accounts, values)
    except CodecError as error:
        raise StoreError(f"{store.path}: a stored state entry is malformed: {error}") from None
    if application.state_digest() != digest:
        raise StoreError(f"{store.path}: the stored state does not match its digest (a state row was edited or lost)")
    return application


def restore_application(store: BlockStore, network: NetworkConfig) -> Restored:
    """Open the durable state and bring it to the tip, re-executing only the blocks after it.

    Cost: reading and hashing every state entry once (linear in the state, not the history),
    the last RECENT_CERTIFICATES_CHECKED certificates, and the blocks the state is behind by
    (all of them for a store written before the state was kept; none after a normal stop or a
    crash, since the state is written in the same transaction as its blocks). Raises StoreError,
    one line, if the state does not match the chain."""
    _check_recent_certificates(store, network)
    genesis = AccountsApplication(network.genesis_balances)
    loaded = store.load_state()
    if loaded is None and store.base_height:
        raise StoreError(f"{store.path}: the store starts at block {store.base_height} from a snapshot, but its state is missing")
    if loaded is None:
        application, state_height, latest_timestamp_ms = genesis, 0, 0
    else:
        state_height, digest, accounts, values, latest_timestamp_ms = loaded
        if state_height > store.height:
            raise StoreError(f"{store.path}: the stored state describes height {state_height}, above the tip {store.height}")
        if state_height < store.base_height:
            raise StoreError(
                f"{store.path}: the stored state describes height {state_height}, below block {store.base_height} the store starts at"
            )
        application = _stored_application(store, accounts, values, digest)
        if state_height == 0:
            expected = genesis.state_digest()
        else:
            block = store.block(state_height)
            assert block is not None  # the open checked there is no gap up to the tip
            expected = block.header.state_digest
        if digest != expected:
            raise StoreError(f"{store.path}: the stored state is not the state of block {state_height} (its digest differs)")
    replayed = 0
    for block in store.iterate_blocks(state_height + 1):
        try:
            verify_execution(application, block)
        except ChainError as error:
            raise StoreError(f"{store.path}: {error}") from None
        latest_timestamp_ms = max(latest_timestamp_ms, block.header.timestamp_ms)
        replayed += 1
    changes = application.take_changes()
    if loaded is None or replayed:
        store.write_state(changes, application.state_digest(), latest_timestamp_ms)
    return Restored(application, latest_timestamp_ms, None if loaded is None else loaded[0], replayed, application.entry_count())


def install_snapshot(
    store: BlockStore, network: NetworkConfig, block: Block, application: AccountsApplication, checkpoint: CheckpointCertificate
) -> None:
    """Start an empty store from a snapshot: `application` holds the state of `block`, which a
    stable checkpoint certifies. A block's commit certificate signs only its batch, not its state
    digest or parent, so it is the CHECKPOINT quorum (sequence, state digest, block hash) that
    vouches for the state: the block must be the one it names and the state must be the one it
    signed. A replica's start then restores that state and replays only the blocks written after
    it. Raises StoreError, one line."""
    problem = checkpoint_certificate_signers_problem(
        checkpoint, network.replica_keys, network.quorum, signing_domain(network.identity, "checkpoint"), verify_signature
    )
    if problem is None and (checkpoint.sequence != block.height or checkpoint.block_hash != block.block_hash):
        problem = f"the checkpoint certifies block {checkpoint.sequence} {checkpoint.block_hash.hex()[:16]}, not this one"
    if problem is None and not (checkpoint.state_digest == block.header.state_digest == application.state_digest()):
        problem = "the state is not the one the checkpoint certifies"
    if problem is None:
        try:
            verify_certificate(block.header, block.certificate, network.identity, network.replica_keys, network.quorum)
        except ChainError as error:
            problem = str(error)
    if problem is not None:
        raise StoreError(f"{store.path}: the snapshot fails verification: {problem}")
    snapshot = application.snapshot()
    changes = StateChanges(tuple((key, balance, nonce) for key, balance, nonce in snapshot[0]), tuple((key, value) for key, value in snapshot[1]))
    store.install_snapshot(block, changes, application.state_digest())


def _check_indexed(store: BlockStore, transaction_id: bytes, location: tuple[int, int], replayed: bool = False) -> int:
    """The index must locate a transaction with a final result here, or at an earlier final
    appearance of the same transaction. 1 if the index row is this one, else 0. In a store that
    starts at a base, a replay's earlier appearance may be below it, its row gone with it."""
    found = store.locate_transaction(transaction_id)
    if found == location:
        return 1
    if found is None and replayed and store.base_height:
        return 0
    if found is not None and found < location:
        earlier = store.block(found[0])
        if (
            earlier is not None
            and found[1] < len(earlier.transactions)
            and earlier.transactions[found[1]].transaction_id == transaction_id
            and is_final(earlier.results[found[1]])
        ):
            return 0
    raise StoreError(f"{store.path}: the transaction index does not locate {transaction_id.hex()[:16]} at block {location[0]}")


@dataclass(frozen=True)
class AuditReport:
    blocks: int
    transactions: int
    state_height: int | None
    state_entries: int
    # 0: audited from genesis, every block re-executed. Else the first block kept (pruned, or a
    # start from a snapshot): blocks from it are checked, and those after the stored state re-executed.
    base_height: int = 0
    blocks_re_executed: int = 0


def audit_store(store: BlockStore, network: NetworkConfig, progress: Callable[[int, int], None] | None = None) -> AuditReport:
    """Check everything from genesis: SQLite's page and index check, every link, stored hash and certificate, every block
    re-executed (results and state digests), the transaction index, and the durable state
    compared entry by entry with the re-executed one at its height. Linear in the history.
    `progress(done, total)` is called about every tenth of the blocks. Raises StoreError.

    A store that starts at a base (pruned, or from a snapshot) is checked from its base instead
    (audit_from_base): what is not kept cannot be checked."""
    if store.base_height:
        return audit_from_base(store, network, progress)
    problem = store.integrity_problem()
    if problem is not None:
        raise StoreError(f"{store.path}: the database file is damaged: {problem}")
    store.verify(recent_max=None)
    stored_state = store.load_state()
    if stored_state is not None and stored_state[0] > store.height:
        raise StoreError(f"{store.path}: the stored state describes height {stored_state[0]}, above the tip {store.height}")
    application = AccountsApplication(network.genesis_balances)
    total = store.height
    step = max(1, total // 10)
    transactions = 0
    indexed = 0  # final transactions the index locates where they are: one row each

    def compare_state(height: int) -> None:
        assert stored_state is not None
        try:
            stored = AccountsApplication.from_entries(stored_state[2], stored_state[3])
        except CodecError as error:
            raise StoreError(f"{store.path}: a stored state entry is malformed: {error}") from None
        if stored.snapshot() != application.snapshot():
            raise StoreError(f"{store.path}: the stored state differs from the state re-executed to height {height}")
        if stored_state[1] != application.state_digest():
            raise StoreError(f"{store.path}: the stored state digest differs from the one re-executed to height {height}")

    if stored_state is not None and stored_state[0] == 0:
        compare_state(0)
    try:
        for block in store.iterate_blocks():
            try:
                verify_certificate(block.header, block.certificate, network.identity, network.replica_keys, network.quorum)
                verify_execution(application, block)
            except ChainError as error:
                raise StoreError(f"{store.path}: store fails verification: {error}") from None
            for position, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
                if is_final(result):
                    indexed += _check_indexed(store, transaction.transaction_id, (block.height, position))
            transactions += len(block.transactions)
            if stored_state is not None and block.height == stored_state[0]:
                compare_state(block.height)
            if progress is not None and (block.height % step == 0 or block.height == total):
                progress(block.height, total)
    except CodecError as error:  # verify() decoded every block already: only a store changed under us gets here
        raise StoreError(f"{store.path}: a block cannot be decoded: {error}") from None
    if store.transaction_index_count() != indexed:
        raise StoreError(f"{store.path}: the transaction index has entries for no stored transaction")
    if stored_state is None:
        return AuditReport(total, transactions, None, 0)
    return AuditReport(total, transactions, stored_state[0], len(stored_state[2]) + len(stored_state[3]))


def audit_from_base(store: BlockStore, network: NetworkConfig, progress: Callable[[int, int], None] | None = None) -> AuditReport:
    """Check a store that keeps blocks only from its base: SQLite's page check; every kept
    block's link, stored hash, contents and commit certificate; the stored state against its
    digest and the state digest of its block; the blocks after the stored state re-executed from
    it; the transaction index for every kept block. The state before the stored state's height is
    not kept, so the kept blocks up to there are not re-executed. Raises StoreError."""
    problem = store.integrity_problem()
    if problem is not None:
        raise StoreError(f"{store.path}: the database file is damaged: {problem}")
    store.verify(recent_max=None)
    loaded = store.load_state()
    if loaded is None:
        raise StoreError(f"{store.path}: the store starts at block {store.base_height}, but its state is missing")
    state_height, digest, accounts, values, _ = loaded
    if not store.base_height <= state_height <= store.height:
        raise StoreError(f"{store.path}: the stored state describes height {state_height}, outside the blocks kept ({store.base_height}..{store.height})")
    application = _stored_application(store, accounts, values, digest)
    total = store.height - store.base_height + 1
    step = max(1, total // 10)
    transactions = indexed = re_executed = 0
    try:
        for block in store.iterate_blocks(store.base_height):
            try:
                verify_certificate(block.header, block.certificate, network.identity, network.replica_keys, network.quorum)
                if block.height == state_height and block.header.state_digest != digest:
                    raise ChainError(f"the stored state is not the state of block {state_height} (its digest differs)")
                if block.height > state_height:
                    verify_execution(application, block)
                    re_executed += 1
            except ChainError as error:
                raise StoreError(f"{store.path}: store fails verification: {error}") from None
            for position, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
                if is_final(result):
                    indexed += _check_indexed(store, transaction.transaction_id, (block.height, position), is_replay(result))
            transactions += len(block.transactions)
            done = block.height - store.base_height + 1
            if progress is not None and (done % step == 0 or done == total):
                progress(done, total)
    except CodecError as error:
        raise StoreError(f"{store.path}: a block cannot be decoded: {error}") from None
    if store.transaction_index_count() != indexed:
        raise StoreError(f"{store.path}: the transaction index has entries for no stored transaction")
    return AuditReport(total, transactions, state_height, len(accounts) + len(values), store.base_height, re_executed)
