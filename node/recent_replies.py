"""Retransmitted requests answered cheaply: recent REPLYs kept encoded, and a budget for reading older ones back from the ledger."""

from __future__ import annotations

from collections import OrderedDict

from ledger.messages import Reply, encode_message

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
# Over all addresses together: a /56 holds 256 /64s, each with its own budget, and every answer
# runs on the event-loop thread (about 1 ms): at most about a fifth of a core in all.
LEDGER_ANSWERS_TOTAL_PER_S = 200.0
LEDGER_ANSWERS_TOTAL_BURST = 256.0


class RecentReplies:
    """The REPLY of each of the last RECENT_REPLIES_MAX transactions this replica executed, once
    its block was written: a REPLY for an executed transaction never changes. Kept as the bytes
    sent, or, when no connection followed its account (so nothing was sent), as the Reply itself,
    encoded on the first retransmission: a client reconnecting as its block executed still gets
    its answer here rather than from the shared ledger budget (found by an adversarial review:
    others behind the same address could drain that budget)."""

    def __init__(self, size_max: int = RECENT_REPLIES_MAX) -> None:
        self.size_max = size_max
        self._payloads: OrderedDict[bytes, bytes | Reply] = OrderedDict()

    def __len__(self) -> int:
        return len(self._payloads)

    def remember(self, transaction_id: bytes, payload: bytes) -> None:
        self._keep(transaction_id, payload)

    def remember_reply(self, transaction_id: bytes, reply: Reply) -> None:
        self._keep(transaction_id, reply)

    def _keep(self, transaction_id: bytes, kept: bytes | Reply) -> None:
        self._payloads[transaction_id] = kept
        if len(self._payloads) > self.size_max:
            self._payloads.popitem(last=False)

    def get(self, transaction_id: bytes) -> bytes | None:
        kept = self._payloads.get(transaction_id)
        if isinstance(kept, Reply):
            kept = self._payloads[transaction_id] = encode_message(kept)
        return kept


class LedgerAnswerBudget:
    """A token bucket: how many retransmitted requests a connection may still have answered from the ledger."""

    def __init__(
        self,
        now_s: float,
        rate_per_s: float = LEDGER_ANSWERS_PER_S,
        burst: float = LEDGER_ANSWERS_BURST,
        parent: LedgerAnswerBudget | None = None,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.refilled_s = now_s
        self.parent = parent  # an answer taken here is taken from the parent too

    def take(self, now_s: float) -> bool:
        """Spend one answer if there is one left at `now_s`, here and in the parent."""
        self.tokens = min(self.burst, self.tokens + max(now_s - self.refilled_s, 0.0) * self.rate_per_s)
        self.refilled_s = now_s
        if self.tokens < 1 or (self.parent is not None and not self.parent.take(now_s)):
            return False
        self.tokens -= 1
        return True


class LedgerAnswerBudgets:
    """One LedgerAnswerBudget per client address, the least recently used forgotten beyond
    LEDGER_ANSWER_ADDRESSES_MAX (a forgotten address starts again with a full burst), all of
    them drawing on one replica-wide budget (`total`)."""

    def __init__(
        self,
        addresses_max: int = LEDGER_ANSWER_ADDRESSES_MAX,
        rate_per_s: float = LEDGER_ANSWERS_PER_S,
        burst: float = LEDGER_ANSWERS_BURST,
        total_rate_per_s: float = LEDGER_ANSWERS_TOTAL_PER_S,
        total_burst: float = LEDGER_ANSWERS_TOTAL_BURST,
    ) -> None:
        self.addresses_max = addresses_max
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.total = LedgerAnswerBudget(0.0, total_rate_per_s, total_burst)  # full at any start time
        self._budgets: OrderedDict[str, LedgerAnswerBudget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._budgets)

    def for_address(self, address: str, now_s: float) -> LedgerAnswerBudget:
        budget = self._budgets.get(address)
        if budget is None:
            budget = self._budgets[address] = LedgerAnswerBudget(now_s, self.rate_per_s, self.burst, self.total)
            if len(self._budgets) > self.addresses_max:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(address)
        return budget
