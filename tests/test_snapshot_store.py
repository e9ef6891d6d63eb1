"""A store started from a verified snapshot: it holds the snapshot's block and the later ones, restarts without replay, and refuses damage."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import chain_helpers
import pytest
from chain_helpers import extend_executed_chain, make_network

from ledger.application import AccountsApplication
from ledger.blocks import Block, verify_execution
from ledger.crypto import signing_domain
from ledger.messages import Checkpoint, CheckpointCertificate
from ledger.restore import audit_store, install_snapshot
from ledger.snapshots import SnapshotAssembly, snapshot_chunks
from ledger.storage import BlockStore, StoreError

NETWORK = make_network("snapshot-store-net")
CHECKPOINT = 40
TIP = 60


def open_replica_store(path: Path) -> tuple[BlockStore, AccountsApplication, int]:
    return chain_helpers.open_replica_store(path, NETWORK)


def source_chain() -> tuple[list[Block], AccountsApplication]:
    """A peer's chain to the tip, and its state frozen at the checkpoint (as it serves it)."""
    application = AccountsApplication(NETWORK.config.genesis_balances)
    chain = extend_executed_chain(NETWORK, application, NETWORK.genesis, 0, CHECKPOINT, 3, distinct_keys=True)
    frozen = application.freeze()
    chain += extend_executed_chain(NETWORK, application, chain[-1].block_hash, CHECKPOINT, TIP - CHECKPOINT, 3, distinct_keys=True)
    assembly = SnapshotAssembly(chain[CHECKPOINT - 1].header.state_digest)
    for chunk in snapshot_chunks(frozen, entries_max=20, bytes_max=2000):
        assembly.add(chunk)
    frozen.release()
    return chain, assembly.application()


CHAIN, SNAPSHOT = source_chain()


def checkpoint_certificate(block: Block, state_digest: bytes | None = None) -> CheckpointCertificate:
    """What a quorum of CHECKPOINTs for `block` gives: every replica signs (height, state digest, hash)."""
    digest = block.header.state_digest if state_digest is None else state_digest
    domain = signing_domain(NETWORK.config.identity, "checkpoint")
    signatures = tuple(
        (replica_id, key.sign(domain, Checkpoint(block.height, digest, block.block_hash, replica_id).signed_bytes()))
        for replica_id, key in enumerate(NETWORK.replica_signing_keys)
    )
    return CheckpointCertificate(block.height, digest, block.block_hash, signatures)


CHECKPOINT_CERTIFICATE = checkpoint_certificate(CHAIN[CHECKPOINT - 1])


def join(path: Path) -> tuple[BlockStore, AccountsApplication]:
    """A replica with an empty store: install the snapshot, then execute only the later blocks."""
    store, _, _ = open_replica_store(path)
    install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT - 1], SNAPSHOT, CHECKPOINT_CERTIFICATE)
    store.close()
    store, application, replayed = open_replica_store(path)
    assert replayed == 0
    for block in CHAIN[CHECKPOINT:]:
        verify_execution(application, block)
        store.write_round([], [block], None, application.take_changes())
    return store, application


def test_a_replica_from_a_snapshot_executes_only_later_blocks_and_restarts_without_replay(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, application = join(path)
    assert (store.base_height, store.height) == (CHECKPOINT, TIP)
    assert store.block(CHECKPOINT - 1) is None and store.block(CHECKPOINT) == CHAIN[CHECKPOINT - 1]
    assert application.state_digest() == CHAIN[-1].header.state_digest
    store.close()
    store, restarted, replayed = open_replica_store(path)
    assert replayed == 0 and store.base_height == CHECKPOINT
    assert restarted.state_digest() == CHAIN[-1].header.state_digest
    store.verify(recent_max=None)
    # `check` audits it from its base: the blocks below were never here.
    report = audit_store(store, NETWORK.config)
    assert (report.base_height, report.blocks, report.state_height, report.blocks_re_executed) == (CHECKPOINT, TIP - CHECKPOINT + 1, TIP, 0)
    store.close()


def test_a_snapshot_is_installed_only_above_a_store_that_starts_from_one(tmp_path: Path) -> None:
    store, _ = join(tmp_path / "ledger.sqlite3")
    with pytest.raises(StoreError, match="not above the stored height"):
        install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT - 1], SNAPSHOT, CHECKPOINT_CERTIFICATE)
    store.close()


def test_an_archive_store_refuses_a_snapshot(tmp_path: Path) -> None:
    store, _, _ = open_replica_store(tmp_path / "ledger.sqlite3")
    store.write_round([], [CHAIN[0]], None, None)
    with pytest.raises(StoreError, match="without blocks"):
        install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT - 1], SNAPSHOT, CHECKPOINT_CERTIFICATE)
    assert store.height == 1 and store.base_height == 0
    store.close()


def test_a_snapshot_whose_block_or_state_does_not_hold_is_refused(tmp_path: Path) -> None:
    store, _, _ = open_replica_store(tmp_path / "ledger.sqlite3")
    block = CHAIN[CHECKPOINT - 1]
    uncertified = dataclasses.replace(block, certificate=dataclasses.replace(block.certificate, signatures=block.certificate.signatures[:1]))
    with pytest.raises(StoreError, match="fails verification"):
        install_snapshot(store, NETWORK.config, uncertified, SNAPSHOT, CHECKPOINT_CERTIFICATE)
    with pytest.raises(StoreError, match="not this one"):
        install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT], SNAPSHOT, CHECKPOINT_CERTIFICATE)  # another block
    with pytest.raises(StoreError, match="not the one the checkpoint certifies"):
        install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT], SNAPSHOT, checkpoint_certificate(CHAIN[CHECKPOINT]))  # another state
    short = dataclasses.replace(CHECKPOINT_CERTIFICATE, signatures=CHECKPOINT_CERTIFICATE.signatures[: NETWORK.quorum - 1])
    with pytest.raises(StoreError, match="without a quorum"):
        install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT - 1], SNAPSHOT, short)
    assert store.height == 0 and store.base_height == 0
    store.close()


def test_a_forged_state_under_a_real_commit_certificate_is_refused(tmp_path: Path) -> None:
    """Regression (adversarial review): the commit certificate signs only the batch, so a block
    whose header names a made-up state digest still carried a valid certificate, and a store was
    installed from a made-up state to match (an attacker's account holding 10^15 included). The
    state must be the one a CHECKPOINT quorum signed for that block hash."""
    store, _, _ = open_replica_store(tmp_path / "ledger.sqlite3")
    block = CHAIN[CHECKPOINT - 1]
    forged_state = AccountsApplication({**NETWORK.balances, bytes(range(32)): 10**15})
    header = dataclasses.replace(block.header, state_digest=forged_state.state_digest())
    forged_block = dataclasses.replace(block, header=header)
    with pytest.raises(StoreError, match="not this one"):
        install_snapshot(store, NETWORK.config, forged_block, forged_state, CHECKPOINT_CERTIFICATE)
    assert store.height == 0 and store.base_height == 0
    store.close()


def execute_sql(path: Path, statement: str, parameters: tuple[object, ...] = ()) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(statement, parameters)
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (f"delete from blocks where height = {TIP - 3}", "blocks are missing"),
        (f"delete from blocks where height = {CHECKPOINT}", "blocks are missing"),
        ("update state_values set value = 'edited' where key = (select min(key) from state_values)", "does not match its digest"),
        (f"update meta set value = {CHECKPOINT - 1} where key = 'state_height'", "below block 40"),
        ("delete from meta where key = 'base_height'", "blocks are missing"),
    ],
    ids=["deleted_block", "deleted_base_block", "edited_state_row", "state_below_the_base", "base_forgotten"],
)
def test_a_damaged_snapshot_store_is_refused_at_start(tmp_path: Path, statement: str, message: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, _ = join(path)
    store.close()
    execute_sql(path, statement)
    with pytest.raises(StoreError, match=message):
        open_replica_store(path)


def test_a_store_told_to_prune_gives_up_its_blocks_for_a_newer_snapshot(tmp_path: Path) -> None:
    # A pruning replica is no archive: behind what its peers keep, it must be able to start over.
    store = BlockStore.open(tmp_path / "ledger.sqlite3", NETWORK.genesis, retain_blocks=100)
    store.write_round([], [CHAIN[0]], None, None)
    assert store.may_install_snapshot
    install_snapshot(store, NETWORK.config, CHAIN[CHECKPOINT - 1], SNAPSHOT, CHECKPOINT_CERTIFICATE)
    assert store.height == store.base_height == CHECKPOINT and store.block(1) is None
    store.close()
