"""What the pure core asks its host to do: persist, send, store blocks, reply (the effects of one round)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger.application import StateChanges
from ledger.blocks import Block
from ledger.evidence import Evidence
from ledger.messages import CheckpointCertificate, Reply


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` to replica `to`, or to every other replica when `to` is None."""

    to: int | None
    message: Any


@dataclass(frozen=True, slots=True)
class Persist:
    """Make this record durable before any Send that follows it."""

    kind: str
    view: int
    sequence: int
    message: Any


@dataclass(frozen=True, slots=True)
class Prune:
    """Durable records may go: log kinds at or below `through_sequence`, and the
    stable-checkpoint, view-change and new-view records older than the ones in force."""

    through_sequence: int
    view: int


@dataclass(frozen=True, slots=True)
class ClientReply:
    account: bytes
    reply: Reply


@dataclass(frozen=True, slots=True)
class Installed:
    """A snapshot joined by state sync: the host stores `block` (the block of the certified
    checkpoint) and the whole state at it (every entry) in one transaction, before this round's
    other writes. The core has already moved on from it (ledger/storage.py install_snapshot)."""

    block: Block
    checkpoint: CheckpointCertificate
    state: StateChanges


@dataclass
class Effects:
    """What the host must do, in this order: persist, send, store blocks, reply to clients.
    `evidence` (another replica's proven equivocation) is kept and reported, in no particular order."""

    persist: list[Persist] = field(default_factory=list)
    send: list[Send] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    replies: list[ClientReply] = field(default_factory=list)
    prune: Prune | None = None
    request_errors: list[tuple[bytes, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    # The application entries `blocks` changed: stored in the same transaction as the blocks, so
    # the durable state is always that of the stored tip (None when there are no blocks).
    state: StateChanges | None = None
    installed: Installed | None = None

    def __bool__(self) -> bool:
        return bool(
            self.installed is not None
            or self.persist
            or self.send
            or self.blocks
            or self.replies
            or self.prune
            or self.request_errors
            or self.events
            or self.evidence
        )
