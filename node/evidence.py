"""Turning two conflicting signed messages from one replica into Evidence, once per slot, bounded (pure)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ledger.evidence import Evidence

# Slots remembered per offending replica, so a replica is not blamed twice for one slot; the
# oldest is forgotten first (the runtime's store drops a repeat anyway).
EVIDENCE_KEYS_PER_REPLICA_MAX = 64
# Accepted PRE-PREPAREs remembered past their slot: a view change clears the slots, and it is the
# VIEW-CHANGEs of other backups that show an equivocating primary's other version.
PRE_PREPARES_REMEMBERED_MAX = 256


class EvidenceCollector:
    """Says when a conflict is evidence: both messages validly signed by the replica they name,
    same kind and slot, different digests, not our own, and not already reported."""

    def __init__(
        self, own_replica_id: int, signed_by: Callable[[str, Any], bool], keys_per_replica_max: int = EVIDENCE_KEYS_PER_REPLICA_MAX
    ) -> None:
        self.own_replica_id = own_replica_id
        self.signed_by = signed_by
        self.keys_per_replica_max = keys_per_replica_max
        self.reported: dict[int, OrderedDict[tuple[str, int, int], None]] = {}
        self.pre_prepares: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.found = 0

    def accepted_pre_prepare(self, header: Any) -> None:
        """Remember (bounded, oldest forgotten) a PRE-PREPARE header this replica accepted."""
        self.pre_prepares[(header.view, header.sequence)] = header
        if len(self.pre_prepares) > PRE_PREPARES_REMEMBERED_MAX:
            self.pre_prepares.popitem(last=False)

    def held_pre_prepare(self, view: int, sequence: int) -> Any | None:
        return self.pre_prepares.get((view, sequence))

    def conflict(self, kind: str, held: Any, other: Any) -> Evidence | None:
        """Evidence if `held` (a message we accepted) and `other` prove equivocation, else None.

        The cheap checks come first; the signatures are checked only for a new conflict, so a
        replica repeating a conflict costs no more Ed25519 work than a duplicate vote."""
        replica_id = held.replica_id
        if replica_id == self.own_replica_id or other.replica_id != replica_id:
            return None
        if (held.view, held.sequence) != (other.view, other.sequence) or held.digest == other.digest:
            return None
        key = (kind, held.view, held.sequence)
        reported = self.reported.get(replica_id)
        if reported is not None and key in reported:
            return None
        # `held` was checked when accepted; the memo makes this second look free.
        if not self.signed_by(kind, other) or not self.signed_by(kind, held):
            return None
        if reported is None:
            reported = self.reported[replica_id] = OrderedDict()
        reported[key] = None
        if len(reported) > self.keys_per_replica_max:
            reported.popitem(last=False)
        self.found += 1
        return Evidence.of(kind, held, other)
