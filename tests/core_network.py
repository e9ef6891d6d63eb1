"""Four real cores, a message queue a test filters by hand, and a logical clock: for driving
schedules (lost messages, late votes, traitors' messages) that seeds rarely hit."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from ledger.application import AccountsApplication
from ledger.blocks import Block
from ledger.crypto import PublicKeyCache, SigningKey
from ledger.messages import Reply
from ledger.transactions import Put, Transaction, sign_transaction
from node.core import ReplicaCore
from node.simulator import simulated_network

Drop = Callable[[int, int, Any], bool]


class Network:
    """Four cores, a message queue the test filters by hand, and a logical clock."""

    def __init__(self) -> None:
        self.client = SigningKey.from_private_bytes(hashlib.sha256(b"regression client").digest())
        self.other = SigningKey.from_private_bytes(hashlib.sha256(b"regression client 2").digest())
        self.config, keys = simulated_network(1, 4, [self.client, self.other])
        self.keys = keys
        signatures = PublicKeyCache()
        self.cores = [
            ReplicaCore(self.config, index, keys[index], AccountsApplication(self.config.genesis_balances), check_signature=signatures.verify)
            for index in range(4)
        ]
        self.queue: list[tuple[int, int, Any]] = []
        self.down: set[int] = set()
        self.now_ms = 0
        self.heights = [0, 0, 0, 0]
        self.replies: list[Reply] = []
        self.blocks: list[list[Block]] = [[], [], [], []]

    def collect(self, index: int) -> None:
        effects = self.cores[index].take_effects()
        for send in effects.send:
            targets = [send.to] if send.to is not None else [other for other in range(4) if other != index]
            self.queue.extend((index, target, send.message) for target in targets)
        self.heights[index] += len(effects.blocks)
        self.blocks[index].extend(effects.blocks)
        self.replies.extend(client_reply.reply for client_reply in effects.replies)

    def drop(self, rule: Drop) -> None:
        self.queue = [entry for entry in self.queue if not rule(*entry)]

    def deliver(self, rule: Drop | None = None) -> None:
        if rule is not None:
            self.drop(rule)
        pending, self.queue = self.queue, []
        for sender, receiver, message in pending:
            if sender in self.down or receiver in self.down:
                continue
            self.cores[receiver].tick(self.now_ms)
            self.cores[receiver].receive_message(sender, message)
            self.collect(receiver)

    def tick(self, step_ms: int) -> None:
        self.now_ms += step_ms
        for index, core in enumerate(self.cores):
            if index not in self.down:
                core.tick(self.now_ms)
                self.collect(index)

    def run(self, total_ms: int, step_ms: int = 100) -> None:
        for _ in range(total_ms // step_ms):
            self.tick(step_ms)
            self.deliver()

    def submit(self, nonce: int) -> Transaction:
        transaction = sign_transaction(self.config.identity, self.client, nonce, Put("key", str(nonce)))
        self.cores[0].receive_request(transaction)
        self.collect(0)
        return transaction

    def start_view_change(self, replicas: tuple[int, ...], view: int) -> None:
        for index in replicas:
            self.cores[index]._start_view_change(view)
            self.collect(index)
