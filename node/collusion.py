"""Colluding traitors (simulator only): together they show one side of the network a second history.

PBFT is safe while at most f of n = 3f + 1 replicas lie. Past that bound, f + 1 traitors that share
what they do can fork the ledger: every traitor signs each slot twice, the honest replicas on
`side` see the second version (the primary's twin batch, and every traitor's PREPARE and COMMIT
for its digest), the other honest replicas the first. A quorum is 2f + 1 = (f + 1) + f, so each
half of the 2f honest replicas, with the traitors, commits its own block at the same height. With
only f traitors neither half plus the traitors reaches a quorum on the second version, and safety
holds. This is a coalition, not one replica's behaviour: it needs every colluder's key, which only
the simulator holds (node/traitors.py behaviours each wrap a single replica).
"""

from __future__ import annotations

import random
from typing import Any

from ledger.config import NetworkConfig
from ledger.crypto import SigningKey
from ledger.messages import Commit, Prepare, PrePrepare
from node.effects import Send
from node.traitors import COLLECTED_SLOTS_MAX, TraitorContext, expand, own_pre_prepare, rebatched


class Coalition:
    """The colluders' shared memory: for each (view, sequence, digest) they signed, the other digest
    they show `side`."""

    def __init__(
        self, network: NetworkConfig, keys: dict[int, SigningKey], domains: dict[str, bytes], side: tuple[int, ...], seed: int
    ) -> None:
        self.side = set(side)
        self.contexts = {
            replica_id: TraitorContext(network, replica_id, key, domains, random.Random(f"coalition/{seed}/{replica_id}"))
            for replica_id, key in keys.items()
        }
        self.twin_pre_prepares: dict[tuple[int, int, bytes], PrePrepare] = {}
        self.twin_digests: dict[tuple[int, int, bytes], bytes] = {}

    def _twin_pre_prepare(self, context: TraitorContext, message: PrePrepare) -> PrePrepare:
        key = (message.view, message.sequence, message.batch.digest)
        twin = self.twin_pre_prepares.get(key)
        if twin is None:
            batch = message.batch
            # The same transactions, so the twin is as valid as the original; another time, so another digest.
            twin_batch = rebatched(batch, timestamp_ms=batch.timestamp_ms + 1, transactions=tuple(reversed(batch.transactions)))
            twin = context.sign(message, batch=twin_batch)
            if len(self.twin_pre_prepares) >= COLLECTED_SLOTS_MAX:
                self.twin_pre_prepares.clear()
                self.twin_digests.clear()
            self.twin_pre_prepares[key] = twin
            self.twin_digests[key] = twin_batch.digest
        return twin

    def _shown_to_side(self, context: TraitorContext, message: Any) -> Any:
        if own_pre_prepare(context, message):
            return self._twin_pre_prepare(context, message)
        if isinstance(message, Prepare | Commit) and message.replica_id == context.replica_id:
            twin_digest = self.twin_digests.get((message.view, message.sequence, message.digest))
            if twin_digest is not None:
                return context.sign(message, digest=twin_digest)
        return message

    def outgoing(self, replica_id: int, sends: list[Send], now_ms: int) -> list[Send]:
        """What traitor `replica_id` sends, with the second history for the replicas on `side`."""
        context = self.contexts.get(replica_id)
        if context is None or not self.side:
            return sends
        context.now_ms = now_ms
        result = []
        for send in expand(context, sends):
            if send.to in self.side:
                result.append(Send(send.to, self._shown_to_side(context, send.message)))
            else:
                result.append(send)
        return result
