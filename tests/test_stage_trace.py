"""The per-stage trace of `ledger-node run --trace-stages`: sampled transactions only, every stage, bounded."""

from __future__ import annotations

import logging

import pytest
from core_network import Network

from ledger.transactions import Put, Transaction, sign_transaction
from node.effects import Effects
from node.stage_trace import STAGES, TRACED_MAX, StageTrace, sampled


def first_transaction(network: Network, want_sampled: bool) -> Transaction:
    """The client's first transaction (nonce 0), its value chosen so that it is sampled or not."""
    for value in range(10_000):
        transaction = sign_transaction(network.config.identity, network.client, 0, Put("key", str(value)))
        if sampled(transaction.transaction_id) == want_sampled:
            return transaction
    raise AssertionError("no such transaction in 10,000 nonces")


def traced_primary(network: Network, trace: StageTrace) -> None:
    """Feed replica 0's effects to `trace` as the runtime does: round, write, replies."""
    core = network.cores[0]
    take = core.take_effects

    def take_and_trace() -> Effects:
        effects = take()
        trace.round_started(effects.send, effects.blocks, 0.0)
        trace.written(effects.blocks)
        for client_reply in effects.replies:
            trace.replied(client_reply.reply.transaction_id)
        return effects

    core.take_effects = take_and_trace  # type: ignore[method-assign]


def test_a_sampled_transaction_gets_one_line_with_every_stage_in_order(caplog: pytest.LogCaptureFixture) -> None:
    network = Network()
    trace = StageTrace(0)
    traced_primary(network, trace)
    transaction = first_transaction(network, want_sampled=True)
    trace.request(transaction.transaction_id)
    with caplog.at_level(logging.INFO, logger="node.stages"):
        network.cores[0].receive_request(transaction)
        network.collect(0)
        network.run(2_000)
    lines = [record.getMessage() for record in caplog.records if record.name == "node.stages"]
    mine = [line for line in lines if transaction.transaction_id.hex() in line]
    assert len(mine) == 1
    stages = [word.split("=")[0] for word in mine[0].split()[3:]]
    assert stages == list(STAGES)
    assert all(sampled(bytes.fromhex(line.split()[2].split("=")[1])) for line in lines)
    assert not trace.moments


def test_an_unsampled_transaction_is_not_followed() -> None:
    network = Network()
    trace = StageTrace(0)
    transaction = first_transaction(network, want_sampled=False)
    trace.request(transaction.transaction_id)
    assert not trace.moments


def test_the_trace_stays_bounded_when_transactions_never_finish() -> None:
    trace = StageTrace(0)
    for number in range(TRACED_MAX + 100):
        trace.request(b"\x00" + number.to_bytes(31, "big"))
    assert len(trace.moments) == TRACED_MAX
