"""The snapshots a replica keeps to serve: its state frozen at each checkpoint, kept once certified (pure).

At every checkpoint the core freezes its application (ledger/application.py freeze(): a
copy-on-write view that costs the tree's node list now and one old value per entry changed
afterwards). When 2f+1 CHECKPOINTs make that sequence stable, the frozen state is kept beside the
certificate and served to joining replicas chunk by chunk (ledger/snapshots.py); a frozen state
whose certificate never comes, or that fell out of the newest SNAPSHOTS_KEPT, is released.

Several stable snapshots are kept, not only the newest: a joining replica fetches the one it
verified while the network moves on, and each new stable checkpoint would otherwise pull the
ground from under a fetch that takes longer than a checkpoint interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.application import AccountsApplication, FrozenState
from ledger.messages import CheckpointCertificate, FetchSnapshot, SnapshotChunk
from ledger.snapshots import SnapshotError, chunk_starting_at

SNAPSHOTS_KEPT = 4


@dataclass(frozen=True, slots=True)
class KeptSnapshot:
    certificate: CheckpointCertificate
    state: FrozenState


class SnapshotKeeper:
    """Frozen states by checkpoint sequence: pending ones (own checkpoints not yet stable) and
    the newest SNAPSHOTS_KEPT stable ones, each with the certificate that vouches for it."""

    def __init__(self) -> None:
        self._pending: dict[int, FrozenState] = {}
        self._stable: dict[int, KeptSnapshot] = {}
        self.chunks_served = 0

    def freeze(self, sequence: int, application: AccountsApplication) -> None:
        """The application's state now is the state at checkpoint `sequence`."""
        if sequence in self._pending or sequence in self._stable:
            return
        self._pending[sequence] = application.freeze()

    def stable(self, certificate: CheckpointCertificate) -> None:
        """A quorum certified `certificate`: keep its frozen state (if this replica has it and it
        is the certified one), release every pending state at or below it and the oldest stable
        ones beyond SNAPSHOTS_KEPT."""
        frozen = self._pending.pop(certificate.sequence, None)
        if frozen is not None:
            if frozen.state_digest() == certificate.state_digest:
                self._stable[certificate.sequence] = KeptSnapshot(certificate, frozen)
            else:
                frozen.release()  # our state differs from the certified one: never serve it
        for sequence in [sequence for sequence in self._pending if sequence <= certificate.sequence]:
            self._pending.pop(sequence).release()
        for sequence in sorted(self._stable)[:-SNAPSHOTS_KEPT]:
            self._stable.pop(sequence).state.release()

    def release_all(self) -> None:
        """The application was replaced (a snapshot was installed): every view of the old one goes."""
        for frozen in self._pending.values():
            frozen.release()
        for kept in self._stable.values():
            kept.state.release()
        self._pending.clear()
        self._stable.clear()

    @property
    def newest(self) -> KeptSnapshot | None:
        return self._stable[max(self._stable)] if self._stable else None

    def kept_sequences(self) -> list[int]:
        return sorted(self._stable)

    def answer(self, request: FetchSnapshot, stable: CheckpointCertificate | None = None) -> SnapshotChunk | None:
        """The chunk asked for, or (chunk None) a certificate when this replica keeps no snapshot
        of the sequence asked (sequence 0 asks for the newest), or when the request is past the
        end of its bucket: the newest kept one's, else `stable` (the replica's stable checkpoint:
        a replica that restarted keeps no snapshot until its next checkpoint is stable, and says
        so rather than stay silent); None with no certificate at all. Costs one chunk's worth of
        work (ledger/snapshots.py bounds; a part of a large bucket costs a pass over that bucket)."""
        newest = self.newest
        if newest is None:
            return None if stable is None else SnapshotChunk(stable, None)
        kept = newest if request.sequence == 0 else self._stable.get(request.sequence)
        if kept is None:
            newer = stable if stable is not None and stable.sequence > newest.certificate.sequence else newest.certificate
            return SnapshotChunk(newer, None)
        try:
            chunk = chunk_starting_at(kept.state, request.first_bucket, first_entry=request.first_entry)
        except SnapshotError:
            return SnapshotChunk(kept.certificate, None)
        self.chunks_served += 1
        return SnapshotChunk(kept.certificate, chunk)
