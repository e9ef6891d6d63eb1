"""Checkpoints and garbage collection: CHECKPOINT votes, the stable checkpoint, the watermarks (part of the pure core).

A mixin of ReplicaCore (node/core.py), which holds the state these methods read and change.
"""

from __future__ import annotations

from ledger.messages import Checkpoint, CheckpointCertificate, PrePrepare
from node.certificates import with_signature
from node.effects import Persist, Prune, Send


class CheckpointProtocol:
    """Every checkpoint_interval blocks: sign, count 2f+1 matching, move the low watermark."""

    def _make_checkpoint(self) -> None:
        unsigned = Checkpoint(self.height, self.application.state_digest(), self.last_block_hash, self.replica_id)
        checkpoint = with_signature(unsigned, self.key.sign(self.domains["checkpoint"], unsigned.signed_bytes()))
        self.own_checkpoints[self.height] = checkpoint
        self.snapshots.freeze(self.height, self.application)
        self.effects.persist.append(Persist("checkpoint", 0, self.height, checkpoint))
        self.effects.send.append(Send(None, checkpoint))
        self._count_checkpoint(checkpoint)

    def _on_checkpoint(self, message: Checkpoint) -> None:
        if message.sequence <= self.low or message.sequence % self.settings.checkpoint_interval:
            return
        if message.sequence > self.low + 4 * self.log_size:
            self._reject("checkpoint too far ahead")
            return
        if message.replica_id in self.checkpoints.get(message.sequence, {}):
            return
        if not self.certificates.signed_by("checkpoint", message):
            self._reject("bad checkpoint signature", f"replica {message.replica_id}")
            return
        self._count_checkpoint(message)

    def _count_checkpoint(self, checkpoint: Checkpoint) -> None:
        votes = self.checkpoints.setdefault(checkpoint.sequence, {})
        votes.setdefault(checkpoint.replica_id, checkpoint)
        matching = [
            vote for vote in votes.values()
            if (vote.state_digest, vote.block_hash) == (checkpoint.state_digest, checkpoint.block_hash)
        ]
        if len(matching) >= self.quorum and checkpoint.sequence > self.low:
            certificate = CheckpointCertificate(
                checkpoint.sequence,
                checkpoint.state_digest,
                checkpoint.block_hash,
                tuple(sorted((vote.replica_id, vote.signature) for vote in matching)),
            )
            self._make_stable(certificate)

    def _make_stable(self, certificate: CheckpointCertificate) -> None:
        """A quorum certified the state at this sequence: it is the new low watermark."""
        self.stable_checkpoint = certificate
        self.low = certificate.sequence
        self.effects.persist.append(Persist("stable-checkpoint", 0, certificate.sequence, certificate))
        self.effects.prune = Prune(certificate.sequence, self.view)
        self.snapshots.stable(certificate)
        self._garbage_collect()
        if self.joining is not None:
            return  # blocks wait for the snapshot: they would land in the store before it
        if self._join_wanted(certificate):
            self._start_join(certificate)
        elif self.height < self.low:
            # The others moved past us: our slots up to there are gone, so fetch certified blocks.
            self._fetch_blocks()

    def _garbage_collect(self) -> None:
        low = self.low
        self.next_sequence = max(self.next_sequence, low + 1)
        for table in (self.slots, self.prepared, self.checkpoints, self.own_checkpoints):
            for sequence in [sequence for sequence in table if sequence <= low]:
                del table[sequence]
        for key in [key for key in self.signed if key[2] <= low]:
            del self.signed[key]
        # A batch stays while anything above low may still need its content: a slot, a prepared
        # certificate, anything this replica signed (a primary alone may hold its batch and must
        # re-send it; this also runs on restart, before slots are rebuilt), or the NEW-VIEW in force.
        live = {slot.digest for slot in self.slots.values()} | {record.certificate.digest for record in self.prepared.values()}
        live |= {message.batch.digest if isinstance(message, PrePrepare) else message.digest for message in self.signed.values()}
        if self.new_view is not None:
            live |= {header.digest for header in self.new_view.pre_prepares if header.sequence > low}
        for digest in [digest for digest in self.batches if digest not in live]:
            del self.batches[digest]
        for digest in [digest for digest in self.missing_batches if digest not in live]:
            del self.missing_batches[digest]
