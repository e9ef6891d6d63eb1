"""The bounded queue of client requests a replica has heard of but not yet executed, pure.

One sender must not be able to fill it for everyone: besides the overall bound, each account and
each replica that relays requests has a share. A traitor replica relaying a flood of valid
requests (accounts cost nothing to make) fills only its own share, so the requests honest backups
relay still reach the primary, and an honest primary is not voted out for refusing them.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict

from ledger.transactions import Transaction

PENDING_REQUESTS_MAX = 100_000
PENDING_PER_ACCOUNT_MAX = 64

BUSY = "replica busy"  # the prefix clients treat as a transient refusal (client/library.py)


class RequestQueue:
    """Requests in arrival order, each remembering when it came and who handed it to us."""

    def __init__(self, replica_count: int, requests_max: int = PENDING_REQUESTS_MAX, per_account_max: int = PENDING_PER_ACCOUNT_MAX) -> None:
        self.requests_max = requests_max
        self.per_account_max = per_account_max
        # Half the queue is for requests handed to us by clients, half for requests relayed by
        # replicas, split evenly among them: neither a client flood nor a relaying traitor can
        # take the room the others need.
        self.direct_max = max(1, requests_max // 2)
        self.per_relayer_max = max(1, requests_max // (2 * replica_count))
        self._requests: OrderedDict[bytes, tuple[Transaction, int, int | None]] = OrderedDict()
        self._per_account: dict[bytes, set[bytes]] = {}  # account -> its waiting transaction ids
        self._per_relayer: Counter[int] = Counter()
        self._relayed = 0  # how many of the waiting requests replicas relayed

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, transaction_id: object) -> bool:
        return transaction_id in self._requests

    def __bool__(self) -> bool:
        return bool(self._requests)

    def refusal(self, transaction: Transaction, relayed_by: int | None) -> str | None:
        """Why this request cannot be queued now (cheap: checked before its signature), or None."""
        if len(self._requests) >= self.requests_max:
            return f"{BUSY}: request queue full"
        if len(self._per_account.get(transaction.sender, ())) >= self.per_account_max:
            return f"{BUSY}: {self.per_account_max} requests of this account already wait"
        if relayed_by is None and len(self._requests) - self._relayed >= self.direct_max:
            return f"{BUSY}: {self.direct_max} requests from clients already wait"
        if relayed_by is not None and self._per_relayer[relayed_by] >= self.per_relayer_max:
            return f"{BUSY}: replica {relayed_by} relayed {self.per_relayer_max} requests that still wait"
        return None

    def admission_simulator(self) -> AdmissionSimulator:
        """Counts that start from this queue's and follow `refusal` over requests not yet added."""
        return AdmissionSimulator(self)

    def add(self, transaction: Transaction, now_ms: int, relayed_by: int | None) -> None:
        self._requests[transaction.transaction_id] = (transaction, now_ms, relayed_by)
        self._per_account.setdefault(transaction.sender, set()).add(transaction.transaction_id)
        if relayed_by is not None:
            self._per_relayer[relayed_by] += 1
            self._relayed += 1

    def remove(self, transaction_id: bytes) -> Transaction | None:
        entry = self._requests.pop(transaction_id, None)
        if entry is None:
            return None
        transaction, _, relayed_by = entry
        self._forget(transaction, relayed_by)
        return transaction

    def pop_oldest(self) -> Transaction:
        _, (transaction, _, relayed_by) = self._requests.popitem(last=False)
        self._forget(transaction, relayed_by)
        return transaction

    def _forget(self, transaction: Transaction, relayed_by: int | None) -> None:
        waiting = self._per_account[transaction.sender]
        waiting.discard(transaction.transaction_id)
        if not waiting:
            del self._per_account[transaction.sender]
        if relayed_by is not None:
            self._relayed -= 1
            self._per_relayer[relayed_by] -= 1
            if not self._per_relayer[relayed_by]:
                del self._per_relayer[relayed_by]

    def oldest_id(self) -> bytes:
        return next(iter(self._requests))

    def transaction(self, transaction_id: bytes) -> Transaction:
        return self._requests[transaction_id][0]

    def ids(self) -> list[bytes]:
        """The waiting requests' ids, oldest first."""
        return list(self._requests)

    def arrived_ms(self, transaction_id: bytes) -> int:
        return self._requests[transaction_id][1]

    def of_account(self, account: bytes) -> list[Transaction]:
        """The account's waiting requests (at most per_account_max of them)."""
        return [self._requests[transaction_id][0] for transaction_id in self._per_account.get(account, ())]

    def oldest(self, count: int) -> list[Transaction]:
        return [transaction for transaction, _, _ in itertools.islice(self._requests.values(), count)]


class AdmissionSimulator:
    """What `RequestQueue.refusal` would say to each of several requests in turn if every earlier
    one were added: lets a host check ahead only the signatures the core will check."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self.total = len(queue._requests)
        self.direct = len(queue._requests) - queue._relayed
        self.per_account: Counter[bytes] = Counter()
        self.per_relayer: Counter[int] = Counter()

    def admit(self, transaction: Transaction, relayed_by: int | None) -> bool:
        queue = self.queue
        if self.total >= queue.requests_max:
            return False
        if len(queue._per_account.get(transaction.sender, ())) + self.per_account[transaction.sender] >= queue.per_account_max:
            return False
        if relayed_by is None and self.direct >= queue.direct_max:
            return False
        if relayed_by is not None and queue._per_relayer[relayed_by] + self.per_relayer[relayed_by] >= queue.per_relayer_max:
            return False
        self.total += 1
        self.per_account[transaction.sender] += 1
        if relayed_by is None:
            self.direct += 1
        else:
            self.per_relayer[relayed_by] += 1
        return True
