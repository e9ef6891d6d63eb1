"""ReplyQuorum on a real generated network config: only f + 1 genuine, matching, signed replies make a receipt."""

from __future__ import annotations

import dataclasses

import pytest

from client.quorum import ReplyQuorum
from ledger.config import NetworkConfig
from ledger.crypto import SigningKey, signing_domain
from ledger.messages import BATCH_REPLY_DOMAIN, Reply, make_replies
from ledger.transactions import TransactionResult

from .local_network import GeneratedNetwork

pytestmark = pytest.mark.integration

TRANSACTION_ID = bytes(range(32))
BLOCK_HASH = bytes(range(32, 64))
HEIGHT = 12
INDEX = 3


def make_reply(
    network: NetworkConfig, key: SigningKey, replica_id: int, height: int = HEIGHT, transaction_id: bytes = TRANSACTION_ID
) -> Reply:
    """Replica `replica_id`'s reply for `transaction_id` at INDEX of a block of five outcomes, signed by `key`."""
    entries = [(bytes([index]) * 32, TransactionResult(True), index) for index in range(5)]
    entries[INDEX] = (transaction_id, TransactionResult(True), INDEX)
    domain = signing_domain(network.identity, BATCH_REPLY_DOMAIN)
    return make_replies(replica_id, 0, height, BLOCK_HASH, entries, lambda data: key.sign(domain, data))[INDEX]


def test_genuine_replies_from_f_plus_one_replicas_form_a_receipt(generated_network: GeneratedNetwork) -> None:
    network, keys = generated_network.network, generated_network.replica_keys
    quorum = ReplyQuorum(network, TRANSACTION_ID)
    needed = network.reply_quorum
    signers = list(range(network.replica_count - needed, network.replica_count))
    for replica_id in signers[:-1]:
        assert quorum.add(make_reply(network, keys[replica_id], replica_id)) is None
    receipt = quorum.add(make_reply(network, keys[signers[-1]], signers[-1]))
    assert receipt is not None
    assert receipt.transaction_id == TRANSACTION_ID
    assert (receipt.height, receipt.index, receipt.block_hash) == (HEIGHT, INDEX, BLOCK_HASH)
    assert receipt.result == TransactionResult(True)
    assert receipt.replicas == tuple(signers)
    assert quorum.ignored == 0


def test_reply_signed_by_a_key_outside_the_config_is_ignored(generated_network: GeneratedNetwork) -> None:
    network, keys = generated_network.network, generated_network.replica_keys
    outsider = SigningKey.generate()
    quorum = ReplyQuorum(network, TRANSACTION_ID)
    # Forgeries claiming to be every replica in turn never count, however many arrive.
    for replica_id in range(network.replica_count):
        assert quorum.add(make_reply(network, outsider, replica_id)) is None
    # Checked lazily, once enough matched to matter: every checked forgery is dropped.
    assert quorum.ignored >= network.replica_count - network.reply_quorum
    assert quorum.replied == set()
    # The forgeries took no replica's place: f + 1 genuine replies still form the receipt.
    for replica_id in range(network.reply_quorum - 1):
        assert quorum.add(make_reply(network, keys[replica_id], replica_id)) is None
    receipt = quorum.add(make_reply(network, keys[network.reply_quorum - 1], network.reply_quorum - 1))
    assert receipt is not None
    assert receipt.replicas == tuple(range(network.reply_quorum))


def test_reply_claiming_another_replica_id_is_ignored(generated_network: GeneratedNetwork) -> None:
    network, keys = generated_network.network, generated_network.replica_keys
    quorum = ReplyQuorum(network, TRANSACTION_ID)
    # One traitor (replica 0) signs replies in the name of f + 1 other replicas, then its own.
    for claimed in range(1, network.reply_quorum + 1):
        assert quorum.add(make_reply(network, keys[0], claimed)) is None
    assert quorum.add(make_reply(network, keys[0], 0)) is None
    # A replica id beyond the configured replicas is ignored too, not an error.
    assert quorum.add(make_reply(network, keys[0], network.replica_count)) is None
    assert 0 < quorum.ignored
    # The forgeries held no replica's place: replica 0 and f genuine others form the receipt.
    receipt = None
    for replica_id in range(1, network.reply_quorum):
        receipt = quorum.add(make_reply(network, keys[replica_id], replica_id))
    assert receipt is not None
    assert receipt.replicas == tuple(range(network.reply_quorum))


def test_replies_that_are_not_f_plus_one_genuine_and_matching_form_no_receipt(generated_network: GeneratedNetwork) -> None:
    network, keys = generated_network.network, generated_network.replica_keys
    faults = network.faults_tolerated
    quorum = ReplyQuorum(network, TRANSACTION_ID)
    # The same genuine reply repeated counts once.
    for _ in range(network.replica_count):
        assert quorum.add(make_reply(network, keys[0], 0)) is None
    # A genuine signature over different content (the height altered after signing) does not verify.
    genuine = make_reply(network, keys[1], 1)
    tampered = dataclasses.replace(genuine, batch=dataclasses.replace(genuine.batch, height=HEIGHT + 1))
    assert quorum.add(tampered) is None
    # A reply for another transaction does not count for this one.
    assert quorum.add(make_reply(network, keys[1], 1, transaction_id=bytes(32))) is None
    # f traitors agreeing on a different height cannot outvote anyone: f < f + 1.
    traitors = list(range(1, 1 + faults))
    for replica_id in traitors:
        assert quorum.add(make_reply(network, keys[replica_id], replica_id, height=HEIGHT + 1)) is None
    # Honest replies complete the genuine group at f + 1: replica 0 and f more.
    honest = [replica_id for replica_id in range(network.replica_count) if replica_id not in traitors and replica_id != 0]
    receipt = None
    for count, replica_id in enumerate(honest[:faults], start=1):
        receipt = quorum.add(make_reply(network, keys[replica_id], replica_id))
        assert (receipt is None) == (count < faults)
    assert receipt is not None
    assert receipt.height == HEIGHT
    assert receipt.replicas == tuple(sorted([0, *honest[:faults]]))
