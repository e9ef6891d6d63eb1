"""Per-stage latency of a sample of transactions inside one replica (`ledger-node run --trace-stages`).

Off by default: an untraced replica never builds one of these. A traced one follows the
transactions whose id starts with a zero byte (about one in 256) and, once its reply is queued,
logs one line on the `node.stages` logger with the CLOCK_MONOTONIC moment of each stage, in
seconds: the same clock for every process on one host, so `ledger-bench --trace-stages` can put
the client's submit and accept around them. Stages (each the start of the event-loop round
that saw it, unless said otherwise):

  request      the request arrived from a client (the primary, or a backup the client retried on)
  pre_prepare  the primary sent, or a backup handled, the PRE-PREPARE holding it
  prepared     this replica sent its COMMIT for that sequence (it is prepared)
  committed    its block was committed and executed
  written      that round's disk write returned (after its fsync)
  replied      its reply was queued for the client's connection
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from ledger.blocks import Block
from ledger.messages import Commit, PrePrepare

# Transactions followed at once: one missing a stage (dropped, deferred) is forgotten, oldest first.
TRACED_MAX = 1024
STAGES = ("request", "pre_prepare", "prepared", "committed", "written", "replied")

log = logging.getLogger("node.stages")


def sampled(transaction_id: bytes) -> bool:
    return transaction_id[:1] == b"\x00"


class StageTrace:
    """What one replica saw of the sampled transactions, and when."""

    def __init__(self, replica_id: int) -> None:
        self.replica_id = replica_id
        self.moments: OrderedDict[bytes, dict[str, float]] = OrderedDict()
        self.by_sequence: dict[int, list[bytes]] = {}

    def _stamp(self, transaction_id: bytes, stage: str, moment: float) -> None:
        stamps = self.moments.get(transaction_id)
        if stamps is None:
            stamps = self.moments[transaction_id] = {}
            if len(self.moments) > TRACED_MAX:
                self.moments.popitem(last=False)
        stamps.setdefault(stage, moment)

    def request(self, transaction_id: bytes) -> None:
        if sampled(transaction_id):
            self._stamp(transaction_id, "request", time.monotonic())

    def pre_prepare(self, message: PrePrepare, moment: float) -> None:
        traced = [transaction.transaction_id for transaction in message.batch.transactions if sampled(transaction.transaction_id)]
        if traced:
            self.by_sequence[message.sequence] = traced
            for transaction_id in traced:
                self._stamp(transaction_id, "pre_prepare", moment)
            while len(self.by_sequence) > TRACED_MAX:
                del self.by_sequence[min(self.by_sequence)]

    def round_started(self, sends: list[Any], blocks: list[Block], moment: float) -> None:
        """The effects of one round, before they are carried out."""
        for send in sends:
            message = send.message
            if isinstance(message, PrePrepare):
                self.pre_prepare(message, moment)
            elif isinstance(message, Commit) and message.replica_id == self.replica_id:
                for transaction_id in self.by_sequence.get(message.sequence, ()):
                    self._stamp(transaction_id, "prepared", moment)
        for block in blocks:
            for transaction in block.transactions:
                if transaction.transaction_id in self.moments:
                    self._stamp(transaction.transaction_id, "committed", moment)

    def written(self, blocks: list[Block]) -> None:
        moment = time.monotonic()
        for block in blocks:
            for transaction in block.transactions:
                if transaction.transaction_id in self.moments:
                    self._stamp(transaction.transaction_id, "written", moment)
            self.by_sequence.pop(block.height, None)

    def replied(self, transaction_id: bytes) -> None:
        stamps = self.moments.pop(transaction_id, None)
        if stamps is None:
            return
        stamps.setdefault("replied", time.monotonic())
        fields = " ".join(f"{stage}={stamps[stage]:.6f}" for stage in STAGES if stage in stamps)
        log.info("stages replica=%d transaction=%s %s", self.replica_id, transaction_id.hex(), fields)
