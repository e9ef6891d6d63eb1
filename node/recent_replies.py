"""Retransmitted requests answered cheaply: recent REPLYs kept encoded, and a budget for reading older ones back from the ledger."""

from __future__ import annotations

from collections import OrderedDict

# A client retransmits a request it has no f + 1 replies for after request_timeout_ms (2 s by
# default) to every replica, so after a slow spell (a view change, an overloaded host) every
# replica sees a retransmission of nearly every request in flight, most of them executed
# already. Answering one from the ledger reads and decodes its whole block and signs its batch
# reply again (about 1 ms); these keep the last few seconds of replies at about 4 MiB.
RECENT_REPLIES_MAX = 8192
# Per client address (an IPv4 address, an IPv6 /64: node/admission.py), shared by its
# connections: answers read back from the ledger (a request older than the kept replies). A
# client flooding old transactions made its replica decode a block and sign for each 200-byte
# frame; now it gets this many a second (after a burst), and the rest are dropped and counted
# (its own retry, or another replica, answers). Per address, not per connection, so that
# reconnecting does not buy a fresh burst.
LEDGER_ANSWERS_PER_S = 20.0
LEDGER_ANSWERS_BURST = 64.0
LEDGER_ANSWER_ADDRESSES_MAX = 4096  # addresses whose budget is remembered (least recent forgotten)


class RecentReplies:
    """The encoded REPLY of each of the last RECENT_REPLIES_MAX transactions this replica
    answered once its block was written: a REPLY for an executed transaction never changes."""

    def __init__(self, size_max: int = RECENT_REPLIES_MAX) -> None:
        self.size_max = size_max
        self._payloads: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._payloads)

    def remember(self, transaction_id: bytes, payload: bytes) -> None:
        self._payloads[transaction_id] = payload
        if len(self._payloads) > self.size_max:
            self._payloads.popitem(last=False)

    def get(self, transaction_id: bytes) -> bytes | None:
        return self._payloads.get(transaction_id)


class LedgerAnswerBudget:
    """A token bucket: how many retransmitted requests a connection may still have answered from the ledger."""

    def __init__(self, now_s: float, rate_per_s: float = LEDGER_ANSWERS_PER_S, burst: float = LEDGER_ANSWERS_BURST) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.refilled_s = now_s

    def take(self, now_s: float) -> bool:
        """Spend one answer if there is one left at `now_s`."""
        self.tokens = min(self.burst, self.tokens + max(now_s - self.refilled_s, 0.0) * self.rate_per_s)
        self.refilled_s = now_s
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class LedgerAnswerBudgets:
    """One LedgerAnswerBudget per client address, the least recently used forgotten beyond
    LEDGER_ANSWER_ADDRESSES_MAX (a forgotten address starts again with a full burst)."""

    def __init__(
        self, addresses_max: int = LEDGER_ANSWER_ADDRESSES_MAX, rate_per_s: float = LEDGER_ANSWERS_PER_S, burst: float = LEDGER_ANSWERS_BURST
    ) -> None:
        self.addresses_max = addresses_max
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._budgets: OrderedDict[str, LedgerAnswerBudget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._budgets)

    def for_address(self, address: str, now_s: float) -> LedgerAnswerBudget:
        budget = self._budgets.get(address)
        if budget is None:
            budget = self._budgets[address] = LedgerAnswerBudget(now_s, self.rate_per_s, self.burst)
            if len(self._budgets) > self.addresses_max:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(address)
        return budget
