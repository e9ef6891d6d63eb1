"""Tests of blocks, commit certificates, chain segments and transaction proofs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from chain_helpers import (
    build_block,
    build_chain,
    make_network,
    make_transactions,
    sign_certificate,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.blocks import (
    Block,
    BlockHeader,
    ChainError,
    CommitCertificate,
    TransactionProof,
    batch_digest,
    genesis_hash,
    prove_transaction,
    verify_block_contents,
    verify_certificate,
    verify_chain_segment,
)
from ledger.crypto import NetworkIdentity
from ledger.encoding import CodecError, decode, encode
from ledger.merkle import merkle_root
from ledger.transactions import TransactionResult

NETWORK = make_network("blocks-net", 4)
NETWORK_7 = make_network("blocks-net-7", 7)
CHAIN = build_chain(NETWORK, 4, transactions_per_block=5)

# Header fields and whether the commit certificate covers them (through the height or batch digest).
CERTIFIED_FIELDS = ["height", "view", "proposer", "transactions_root", "timestamp_ms"]
HASH_FIELDS = ["parent_hash", "transactions_root", "state_digest"]


def verify_quorum(block: Block, network: Any = NETWORK, identity: NetworkIdentity | None = None) -> None:
    verify_certificate(
        block.header,
        block.certificate,
        network.identity if identity is None else identity,
        network.replica_keys,
        network.quorum,
    )


def with_certificate(block: Block, certificate: CommitCertificate | None) -> Block:
    return dataclasses.replace(block, certificate=certificate)


# ---- chain segments ----


def test_a_built_chain_verifies_whole_and_from_any_point() -> None:
    verify_chain_segment(CHAIN, NETWORK.genesis, 0)
    for start in range(1, len(CHAIN)):
        verify_chain_segment(CHAIN[start:], CHAIN[start - 1].block_hash, start)
    verify_chain_segment([], NETWORK.genesis, 0)
    for block in CHAIN:
        verify_quorum(block)


def test_broken_link_is_caught() -> None:
    tampered_header = dataclasses.replace(CHAIN[2].header, parent_hash=CHAIN[0].block_hash)
    broken = [*CHAIN[:2], dataclasses.replace(CHAIN[2], header=tampered_header), *CHAIN[3:]]
    with pytest.raises(ChainError, match="block 3: parent hash"):
        verify_chain_segment(broken, NETWORK.genesis, 0)
    with pytest.raises(ChainError, match="parent hash"):
        verify_chain_segment(CHAIN, b"\x00" * 32, 0)


def test_wrong_height_is_caught() -> None:
    with pytest.raises(ChainError, match="expected block 1, found block 2"):
        verify_chain_segment(CHAIN[1:], NETWORK.genesis, 0)
    with pytest.raises(ChainError, match="expected block 3, found block 4"):
        verify_chain_segment([CHAIN[0], CHAIN[1], CHAIN[3]], NETWORK.genesis, 0)
    with pytest.raises(ChainError, match="expected block 2"):
        verify_chain_segment([CHAIN[0], CHAIN[0]], NETWORK.genesis, 0)


def test_tampered_transaction_is_caught() -> None:
    block = CHAIN[1]
    stranger = make_transactions(NETWORK, 1000, 1)[0]
    replaced = dataclasses.replace(block, transactions=(stranger, *block.transactions[1:]))
    with pytest.raises(ChainError, match="block 2: transactions do not match"):
        verify_chain_segment([CHAIN[0], replaced], NETWORK.genesis, 0)
    dropped = dataclasses.replace(block, transactions=block.transactions[1:], results=block.results[1:])
    with pytest.raises(ChainError, match="transactions root"):
        verify_block_contents(dropped)
    reordered = dataclasses.replace(block, transactions=tuple(reversed(block.transactions)))
    with pytest.raises(ChainError, match="transactions root"):
        verify_block_contents(reordered)


def test_results_must_match_the_transactions_one_for_one() -> None:
    block = CHAIN[0]
    with pytest.raises(ChainError, match="results for"):
        verify_block_contents(dataclasses.replace(block, results=block.results[:-1]))


def test_a_transaction_twice_in_one_block_is_caught() -> None:
    transaction = make_transactions(NETWORK, 0, 1)[0]
    block = build_block(NETWORK, NETWORK.genesis, 1, [transaction, transaction])
    with pytest.raises(ChainError, match="appears twice"):
        verify_block_contents(block)


@given(
    position=st.integers(0, len(CHAIN) - 2),
    field_name=st.sampled_from(sorted({*CERTIFIED_FIELDS, *HASH_FIELDS})),
    replacement=st.binary(min_size=32, max_size=32),
    number=st.integers(0, 63),
)
@settings(derandomize=True, max_examples=60)
def test_any_tampered_header_field_is_caught(position: int, field_name: str, replacement: bytes, number: int) -> None:
    """A certified field breaks the certificate; the others break the next block's link."""
    block = CHAIN[position]
    original = getattr(block.header, field_name)
    value: Any = replacement if field_name in HASH_FIELDS else number
    if value == original:
        value = original + 1 if isinstance(original, int) else bytes(32 - len(original)) + b"\x01"
    tampered = dataclasses.replace(block, header=dataclasses.replace(block.header, **{field_name: value}))
    assert tampered.block_hash != block.block_hash
    segment = [*CHAIN[:position], tampered, *CHAIN[position + 1 :]]
    with pytest.raises(ChainError):
        verify_chain_segment(segment, NETWORK.genesis, 0)
    if field_name in CERTIFIED_FIELDS:
        with pytest.raises(ChainError):
            verify_quorum(tampered)


# ---- certificates ----


@pytest.mark.parametrize("network", [NETWORK, NETWORK_7], ids=["n4", "n7"])
def test_certificate_needs_a_quorum_of_distinct_valid_signers(network: Any) -> None:
    block = build_chain(network, 1)[0]
    header = block.header
    every = list(range(network.replica_count))
    verify_quorum(with_certificate(block, sign_certificate(network, header, every)), network)
    verify_quorum(with_certificate(block, sign_certificate(network, header, every[-network.quorum :])), network)

    too_few = sign_certificate(network, header, every[: network.quorum - 1])
    with pytest.raises(ChainError, match=f"{network.quorum - 1} valid commit signatures, {network.quorum} needed"):
        verify_quorum(with_certificate(block, too_few), network)

    duplicated = CommitCertificate(too_few.view, (*too_few.signatures, too_few.signatures[0]))
    with pytest.raises(ChainError, match="valid commit signatures"):
        verify_quorum(with_certificate(block, duplicated), network)

    for other in (NetworkIdentity("another-net", network.genesis), NetworkIdentity(network.network_id, bytes(32))):
        other_network = sign_certificate(network, header, every, identity=other)
        with pytest.raises(ChainError, match="valid commit signatures"):
            verify_quorum(with_certificate(block, other_network), network)
        with pytest.raises(ChainError, match="valid commit signatures"):
            verify_quorum(block, network, identity=other)


def test_certificate_signatures_must_come_from_the_named_replica() -> None:
    block = CHAIN[0]
    certificate = block.certificate
    assert certificate is not None
    # Replica 0's signature presented as replica 3's, and ids beyond the replica set, count for nothing.
    signatures = list(certificate.signatures)
    signatures[-1] = (3, signatures[0][1])
    with pytest.raises(ChainError):
        verify_quorum(with_certificate(block, CommitCertificate(certificate.view, tuple(signatures))))
    beyond = (*certificate.signatures[:-1], (10, certificate.signatures[-1][1]))
    with pytest.raises(ChainError):
        verify_quorum(with_certificate(block, CommitCertificate(certificate.view, beyond)))
    with pytest.raises(ChainError, match="no commit certificate"):
        verify_quorum(with_certificate(block, None))


def test_certificate_view_and_height_are_signed() -> None:
    block = build_block(NETWORK, NETWORK.genesis, 1, make_transactions(NETWORK, 0, 2), view=3)
    later_view = sign_certificate(NETWORK, block.header, view=5)
    verify_quorum(with_certificate(block, later_view))
    earlier_view = sign_certificate(NETWORK, block.header, view=2)
    with pytest.raises(ChainError, match="certificate view precedes"):
        verify_quorum(with_certificate(block, earlier_view))
    relabelled = CommitCertificate(4, later_view.signatures)
    with pytest.raises(ChainError, match="valid commit signatures"):
        verify_quorum(with_certificate(block, relabelled))
    other_height = dataclasses.replace(block.header, height=2)
    with pytest.raises(ChainError, match="valid commit signatures"):
        verify_certificate(other_height, block.certificate, NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)


@given(
    signers=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=12),
)
@settings(derandomize=True, max_examples=60)
def test_certificate_verdict_counts_distinct_valid_signers(signers: list[tuple[int, bool]]) -> None:
    network = NETWORK_7
    block = build_chain(network, 1)[0]
    valid = sign_certificate(network, block.header, range(network.replica_count))
    signature_of = dict(valid.signatures)
    entries = []
    for replica_id, is_valid in signers:
        if replica_id < network.replica_count and is_valid:
            entries.append((replica_id, signature_of[replica_id]))
        else:
            entries.append((replica_id, bytes(64)))
    distinct_valid = {
        replica_id for replica_id, is_valid in signers if is_valid and replica_id < network.replica_count
    }
    candidate = with_certificate(block, CommitCertificate(valid.view, tuple(entries)))
    if len(distinct_valid) >= network.quorum:
        verify_quorum(candidate, network)
    else:
        with pytest.raises(ChainError):
            verify_quorum(candidate, network)


# ---- transaction proofs ----


@given(position=st.integers(0, len(CHAIN) - 1), index=st.integers(0, 4), flip=st.integers(1, 255))
@settings(derandomize=True, max_examples=40)
def test_transaction_proof_verifies_and_fails_when_tampered(position: int, index: int, flip: int) -> None:
    block = CHAIN[position]
    proof = prove_transaction(block, index)
    proof.verify(NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)
    assert TransactionProof.from_plain(decode(encode(proof.to_plain()))) == proof

    other_index = (index + 1) % len(block.transactions)
    forgeries = [
        dataclasses.replace(proof, transaction=block.transactions[other_index]),
        dataclasses.replace(proof, index=other_index),
        dataclasses.replace(proof, header=dataclasses.replace(proof.header, timestamp_ms=proof.header.timestamp_ms + flip)),
        dataclasses.replace(proof, header=CHAIN[(position + 1) % len(CHAIN)].header),
        dataclasses.replace(proof, certificate=CommitCertificate(proof.certificate.view, proof.certificate.signatures[:-1])),
    ]
    if proof.path:
        path = [bytearray(item) for item in proof.path]
        path[flip % len(path)][flip % 32] ^= flip
        forgeries.append(dataclasses.replace(proof, path=tuple(bytes(item) for item in path)))
        forgeries.append(dataclasses.replace(proof, path=proof.path[:-1]))
    for forgery in forgeries:
        with pytest.raises(ChainError):
            forgery.verify(NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)
    with pytest.raises(ChainError):
        proof.verify(NetworkIdentity("another-net", NETWORK.genesis), NETWORK.replica_keys, NETWORK.quorum)


def test_transaction_proof_for_single_transaction_block_and_missing_certificate() -> None:
    block = build_block(NETWORK, NETWORK.genesis, 1, make_transactions(NETWORK, 0, 1))
    proof = prove_transaction(block, 0)
    assert proof.path == ()
    proof.verify(NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)
    with pytest.raises(CodecError):
        prove_transaction(with_certificate(block, None), 0)


def test_transaction_proof_cannot_claim_another_position() -> None:
    block = build_block(NETWORK, NETWORK.genesis, 1, make_transactions(NETWORK, 0, 3))
    proof = prove_transaction(block, 2)
    forged = dataclasses.replace(proof, index=1, leaf_count=2)
    with pytest.raises(ChainError):
        forged.verify(NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)


# ---- encoding and identity ----


def test_block_hash_is_the_hash_of_the_header_only() -> None:
    block = CHAIN[0]
    assert with_certificate(block, None).block_hash == block.block_hash
    different_results = dataclasses.replace(block, results=tuple(TransactionResult(False, "x") for _ in block.results))
    assert different_results.block_hash == block.block_hash
    assert Block.decode(block.encode()) == block
    assert BlockHeader.from_plain(block.header.to_plain()).block_hash == block.block_hash


def test_batch_digest_names_view_proposer_timestamp_and_root() -> None:
    root = merkle_root([])
    base = batch_digest(1, 1, 100, root)
    assert base == batch_digest(1, 1, 100, root)
    assert len({base, batch_digest(2, 1, 100, root), batch_digest(1, 2, 100, root), batch_digest(1, 1, 101, root)}) == 4
    assert batch_digest(1, 1, 100, b"\x00" * 32) != base


def test_genesis_hash_pins_network_replicas_and_balances() -> None:
    keys = NETWORK.replica_keys
    base = genesis_hash("net", keys, {keys[0]: 5})
    assert base == genesis_hash("net", list(keys), {keys[0]: 5})
    assert base != genesis_hash("other", keys, {keys[0]: 5})
    assert base != genesis_hash("net", tuple(reversed(keys)), {keys[0]: 5})
    assert base != genesis_hash("net", keys, {keys[0]: 6})
    assert base != genesis_hash("net", keys, {})


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda plain: plain[:3], id="missing-certificate-slot"),
        pytest.param(lambda plain: [plain[0][:6], *plain[1:]], id="short-header"),
        pytest.param(lambda plain: [[*plain[0][:2], 64, *plain[0][3:]], *plain[1:]], id="proposer-out-of-range"),
        pytest.param(lambda plain: [[*plain[0][:3], b"x", *plain[0][4:]], *plain[1:]], id="short-parent-hash"),
        pytest.param(lambda plain: [*plain[:3], [0, [[0, b"x" * 63]]]], id="short-signature"),
        pytest.param(lambda plain: [*plain[:3], [0, [[64, b"x" * 64]]]], id="replica-id-out-of-range"),
        pytest.param(lambda plain: [*plain[:3], [0, [[0, b"x" * 64]] * 65]], id="too-many-signatures"),
        pytest.param(lambda plain: [plain[0], plain[1], [[True]], plain[3]], id="bad-result"),
    ],
)
def test_malformed_blocks_are_refused(mutation: Any) -> None:
    with pytest.raises(CodecError):
        Block.decode(encode(mutation(CHAIN[0].to_plain())))
