"""`verify --from-checkpoint` against fake replicas: it starts only from a checkpoint whose 2f+1 signatures verify and whose block it is, and checks every later block."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from chain_helpers import build_executed_chain, make_network, sign_certificate

from client.library import ChainReport, ClientError, open_client
from ledger.blocks import Block, ChainError
from ledger.crypto import signing_domain
from ledger.messages import Checkpoint, CheckpointCertificate

from .fake_replicas import FakeReplica, write_client_config

pytestmark = pytest.mark.integration

NETWORK = make_network("from-checkpoint-net")
CHAIN = build_executed_chain(NETWORK, 12)
CHECKPOINT_HEIGHT = 8
SERVING_REPLICA = 1


def certificate(height: int, block_hash: bytes, state_digest: bytes, signers: range | tuple[int, ...]) -> CheckpointCertificate:
    domain = signing_domain(NETWORK.config.identity, "checkpoint")
    signatures = tuple(
        (replica_id, NETWORK.replica_signing_keys[replica_id].sign(domain, Checkpoint(height, state_digest, block_hash, replica_id).signed_bytes()))
        for replica_id in signers
    )
    return CheckpointCertificate(height, state_digest, block_hash, signatures)


STABLE = certificate(CHECKPOINT_HEIGHT, CHAIN[CHECKPOINT_HEIGHT - 1].block_hash, CHAIN[CHECKPOINT_HEIGHT - 1].header.state_digest, range(4))


@asynccontextmanager
async def fake_network(tmp_path: Path, served_chain: list[Block], checkpoint: CheckpointCertificate | None) -> AsyncIterator[Path]:
    replicas = [
        FakeReplica(NETWORK, replica_id, CHAIN, served_chain if replica_id == SERVING_REPLICA else CHAIN, checkpoint=checkpoint)
        for replica_id in range(NETWORK.replica_count)
    ]
    config_path = tmp_path / "client.toml"
    async with trio.open_nursery() as nursery:
        for replica in replicas:
            await nursery.start(replica.serve)
        write_client_config(config_path, NETWORK, replicas)
        yield config_path
        nursery.cancel_scope.cancel()


async def verify_from_checkpoint(tmp_path: Path, served_chain: list[Block], checkpoint: CheckpointCertificate | None) -> ChainReport:
    """The report, or the ChainError or ClientError the audit raised (taken out of the servers' nursery)."""
    outcome: ChainReport | ChainError | ClientError
    async with fake_network(tmp_path, served_chain, checkpoint) as config_path:
        async with open_client(config_path) as client:
            with trio.fail_after(30):
                try:
                    outcome = await client.verify_chain_from_checkpoint(SERVING_REPLICA)
                except (ChainError, ClientError) as error:
                    outcome = error
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def with_block(chain: list[Block], index: int, block: Block) -> list[Block]:
    return [*chain[:index], block, *chain[index + 1 :]]


async def test_a_verified_checkpoint_starts_the_audit_and_every_later_block_is_checked(tmp_path: Path) -> None:
    report = await verify_from_checkpoint(tmp_path, CHAIN, STABLE)
    assert (report.from_height, report.height, report.last_block_hash) == (CHECKPOINT_HEIGHT, 12, CHAIN[-1].block_hash)
    assert report.checkpoint_signers == (0, 1, 2, 3)
    assert report.transactions == sum(len(block.transactions) for block in CHAIN[CHECKPOINT_HEIGHT:])


async def test_a_checkpoint_short_of_a_quorum_is_refused(tmp_path: Path) -> None:
    short = certificate(CHECKPOINT_HEIGHT, STABLE.block_hash, STABLE.state_digest, range(NETWORK.quorum - 1))
    with pytest.raises(ChainError, match="without a quorum"):
        await verify_from_checkpoint(tmp_path, CHAIN, short)


async def test_a_checkpoint_with_a_forged_signature_is_refused(tmp_path: Path) -> None:
    forged = dataclasses.replace(STABLE, signatures=((0, bytes(64)), *STABLE.signatures[1:]))
    with pytest.raises(ChainError, match="bad signature from replica 0"):
        await verify_from_checkpoint(tmp_path, CHAIN, forged)


async def test_a_block_that_is_not_the_certified_one_is_refused(tmp_path: Path) -> None:
    """A replica serving another block at the checkpoint's height (here: certified by a real
    commit certificate, but with a made-up state digest) cannot start the audit there."""
    start = CHAIN[CHECKPOINT_HEIGHT - 1]
    header = dataclasses.replace(start.header, state_digest=bytes(32))
    other = dataclasses.replace(start, header=header, certificate=sign_certificate(NETWORK, header))
    with pytest.raises(ChainError, match="not the block its checkpoint certificate signs"):
        await verify_from_checkpoint(tmp_path, with_block(CHAIN, CHECKPOINT_HEIGHT - 1, other), STABLE)


async def test_a_later_block_without_a_quorum_certificate_is_refused(tmp_path: Path) -> None:
    later = CHAIN[CHECKPOINT_HEIGHT + 1]
    short = dataclasses.replace(later, certificate=sign_certificate(NETWORK, later.header, signers=range(NETWORK.quorum - 1)))
    with pytest.raises(ChainError, match=f"block {later.height}: "):
        await verify_from_checkpoint(tmp_path, with_block(CHAIN, CHECKPOINT_HEIGHT + 1, short), STABLE)


async def test_a_broken_link_after_the_checkpoint_is_refused(tmp_path: Path) -> None:
    later = CHAIN[CHECKPOINT_HEIGHT]
    header = dataclasses.replace(later.header, parent_hash=bytes(32))
    relinked = dataclasses.replace(later, header=header, certificate=sign_certificate(NETWORK, header))
    with pytest.raises(ChainError, match=f"block {later.height}: parent hash does not match"):
        await verify_from_checkpoint(tmp_path, with_block(CHAIN, CHECKPOINT_HEIGHT, relinked), STABLE)


async def test_a_truncated_chain_after_the_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("client.library.CHAIN_CATCH_UP_S", 0.5)
    with pytest.raises(ChainError, match="chain ends at block 10, but f\\+1 replicas vouch for height 12"):
        await verify_from_checkpoint(tmp_path, CHAIN[:10], STABLE)


async def test_a_replica_without_a_stable_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="no stable checkpoint yet"):
        await verify_from_checkpoint(tmp_path, CHAIN, None)
