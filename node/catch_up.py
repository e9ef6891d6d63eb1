"""Catching up: status, retransmission, fetching blocks, and joining by state sync (part of the pure core).

A mixin of ReplicaCore (node/core.py), which holds the state these methods read and change.
"""

from __future__ import annotations

from typing import Any

from ledger.application import StateChanges
from ledger.blocks import Block, ChainError, verify_block_contents, verify_certificate
from ledger.encoding import CodecError
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    Batch,
    Blocks,
    CheckpointCertificate,
    FetchBlocks,
    PrePrepare,
    Request,
    SnapshotChunk,
    Status,
)
from node.effects import Installed, Send
from node.state_join import ATTEMPT_TIMEOUTS_MAX, StateJoin

RELAYS_PER_INTERVAL_MAX = 16  # waiting requests a backup re-relays to the primary per status interval

# What a state sync counts that means a peer served something useless or false (logged as refusals).
JOIN_REFUSALS = (
    "snapshot chunk does not verify",
    "snapshot chunk of another checkpoint",
    "snapshot not kept by the peer",
    "snapshot block is not the certified one",
    "snapshot block contents do not match its header",
)


class CatchUp:
    """A replica behind fetches certified blocks, or far behind a certified snapshot (node/state_join.py)."""

    def _on_status_interval(self) -> None:
        self.effects.send.append(Send(None, Status(self.replica_id, self.view, self.height)))
        stalled = self.height == self.height_at_last_status
        self.height_at_last_status = self.height
        self._retransmit()
        self._follow_higher_views()
        if self.joining is not None:
            return
        best = max(self.peer_heights.values(), default=0)
        fetch_due = self.fetch_sent_ms is None or self.now_ms - self.fetch_sent_ms >= 2 * self.settings.status_interval_ms
        behind = self.height < self.low or best > self.height + self.settings.window_size
        if best > self.height and (stalled or behind) and fetch_due:
            self._fetch_blocks()

    def _follow_higher_views(self) -> None:
        """f + 1 peers report a higher view: at least one honest replica is there, so go too."""
        higher = sorted((view for view in self.peer_views.values() if view > self.view), reverse=True)
        if len(higher) >= self.faults + 1:
            self._start_view_change(higher[self.faults])

    def _fetch_blocks(self) -> None:
        # Rotate among the peers that claim to be ahead, so one lying or slow peer cannot stall us.
        ahead = [replica for replica, height in sorted(self.peer_heights.items()) if height > self.height]
        if not ahead:
            ahead = [replica for replica in range(self.replica_count) if replica != self.replica_id]
        peer = ahead[self.fetch_peer_cursor % len(ahead)]
        self.fetch_peer_cursor += 1
        self.fetch_sent_ms = self.now_ms
        self.effects.send.append(Send(peer, FetchBlocks(self.height + 1, BLOCKS_PER_RESPONSE_MAX)))

    def _retransmit(self) -> None:
        """Re-send own messages that may have been lost; PBFT assumes eventual delivery."""
        if not self.view_active:
            if self.own_view_change is not None and self.own_view_change.new_view == self.view:
                self.effects.send.append(Send(None, self.own_view_change))
            return
        checkpoint = max(self.own_checkpoints.items(), default=None)
        if checkpoint is not None and checkpoint[0] > self.low:
            self.effects.send.append(Send(None, checkpoint[1]))
        if not self.is_primary:
            # A relay is a message like any other: one lost on the way would let the request
            # timer expire against a primary that never heard of the request.
            for transaction in self._relayed_requests(RELAYS_PER_INTERVAL_MAX):
                if transaction.transaction_id not in self.proposed:
                    self.effects.send.append(Send(self.primary, Request(transaction)))
        interval = self.settings.status_interval_ms
        for sequence in sorted(self.slots):
            slot = self.slots[sequence]
            if sequence <= self.height or self.now_ms - slot.last_sent_ms < interval:
                continue
            slot.last_sent_ms = self.now_ms
            if self.is_primary and slot.pre_prepare is not None and slot.batch is not None:
                header = slot.pre_prepare
                self.effects.send.append(
                    Send(None, PrePrepare(header.view, header.sequence, slot.batch, header.replica_id, header.signature))
                )
            if slot.own_prepare is not None:
                self.effects.send.append(Send(None, slot.own_prepare))
            if slot.own_commit is not None:
                self.effects.send.append(Send(None, slot.own_commit))
            if slot.pre_prepare is not None and slot.batch is None:
                self._ask_for_batch(slot.pre_prepare.digest)

    def _on_status(self, sender: int, message: Status) -> None:
        if message.replica_id != sender:
            self._reject("status for another replica")
            return
        self.peer_heights[sender] = message.height
        self.peer_views[sender] = message.view

    def _on_blocks(self, sender: int, message: Blocks) -> None:
        """Apply fetched blocks whose commit certificates verify; trust the sender for nothing.

        Only the certified batch is taken from the peer. Results, state digest and block hash
        are recomputed by executing it, so a peer cannot slip in a wrong state.
        """
        self.fetch_sent_ms = None
        checkpoint = message.checkpoint
        if self.joining is not None:
            self._on_join_blocks(sender, message)
            return
        # A peer that pruned the blocks we need answers from its base up: only a snapshot helps.
        # Believed from f + 1 peers only (at least one honest): one traitor leaving out a block
        # must not make a replica throw its state away for a snapshot.
        if message.blocks and message.blocks[0].height > self.height + 1:
            self.pruned_reports[sender] = self.height
        pruned_past_us = sum(1 for height in self.pruned_reports.values() if height == self.height) > self.faults
        if checkpoint is not None and checkpoint.sequence >= self.low and self._join_wanted(checkpoint, pruned_past_us):
            # Far behind: take the certificate first, and the snapshot it vouches for instead
            # of these blocks (stored blocks would make the store unable to start from it).
            if checkpoint == self.stable_checkpoint:
                self._start_join(checkpoint)  # already verified, and stable here
                return
            problem = self.certificates.checkpoint_certificate_problem(checkpoint) if checkpoint.sequence > self.low else "not above ours"
            if problem is None:
                self._make_stable(checkpoint)
                if self.joining is None:
                    self._start_join(checkpoint)
                return
            self._reject("bad checkpoint certificate", f"from replica {sender}: {problem}")
        applied = 0
        for block in message.blocks:
            if block.height <= self.height:
                continue
            if block.height != self.height + 1:
                break
            try:
                verify_block_contents(block)
                verify_certificate(
                    block.header, block.certificate, self.network.identity, self.replica_keys, self.quorum, self.signatures.verify
                )
            except (ChainError, CodecError) as error:
                self._reject("bad fetched block", f"from replica {sender}: {error}")
                break
            header = block.header
            batch = Batch(header.view, header.proposer, header.timestamp_ms, block.transactions)
            assert block.certificate is not None
            own = self._execute_batch(batch, block.certificate)
            if own.block_hash != block.block_hash:
                self.effects.events.append(
                    f"fetched block {block.height} from replica {sender} claims another state; using our own execution"
                )
            applied += 1
        if checkpoint is not None and checkpoint.sequence > self.low:
            # Peers stop re-sending CHECKPOINTs once stable for them; the certificate lets a
            # replica that caught up by fetching move its watermarks as well.
            problem = self.certificates.checkpoint_certificate_problem(checkpoint)
            if problem is None:
                self._make_stable(checkpoint)
            else:
                self._reject("bad checkpoint certificate", f"from replica {sender}: {problem}")
        if applied:
            self.effects.events.append(f"caught up {applied} blocks from replica {sender}, height {self.height}")
            self.peer_heights[sender] = max(self.peer_heights.get(sender, 0), self.height)
            self._execute_ready()
            if self.peer_heights.get(sender, 0) > self.height or self.height < self.low:
                self._fetch_blocks()

    # ---- joining by state sync (node/state_join.py) ----

    def _join_wanted(self, certificate: CheckpointCertificate, blocks_pruned: bool = False) -> bool:
        """Whether to join at `certificate` by state sync: far behind it, or behind it with the
        blocks in between pruned by the peer asked."""
        behind = certificate.sequence - self.height
        if not self.state_sync_allowed or self.joining is not None or certificate.sequence <= self.join_failed_through:
            return False
        if blocks_pruned:
            return behind > 0
        distance = self.settings.state_sync_distance
        # After an install, join again only if catching up by blocks loses ground: the gap grew
        # by more than the distance since (not merely because the network moved on meanwhile).
        return behind > distance and (self.joined_at is None or behind > self.gap_at_install + distance)

    def _start_join(self, certificate: CheckpointCertificate) -> None:
        peers = [replica for replica in range(self.replica_count) if replica != self.replica_id]
        # A full chunk (1 MiB, 65,536 entries) takes about a second to build, send and check on a
        # slow machine: a shorter timeout asks twice for much of a large state (late answers count).
        request_timeout_ms = 4 * self.settings.status_interval_ms
        self.joining = StateJoin(certificate, peers, request_timeout_ms, self.now_ms)
        self.effects.events.append(
            f"state sync: {certificate.sequence - self.height} blocks behind the stable checkpoint at {certificate.sequence}; "
            "fetching its snapshot instead of the blocks"
        )
        self._join_tick()

    def _join_tick(self) -> None:
        joining = self.joining
        assert joining is not None
        self._take_newer_checkpoints(joining)
        newest = self.stable_checkpoint
        # Peers keep a few snapshots only (node/snapshot_keeper.py): once f + 1 peers were dropped
        # (so at least one honest one, which drops only for "not kept") and a newer certificate is
        # in hand (verified), move to that one at once. One liar saying "not kept" cannot do it.
        moved_on = (
            newest is not None
            and newest.sequence > joining.checkpoint.sequence
            and not joining.state_complete
            and len(joining.fetch.dropped) > self.faults
            and joining.fetch.counters.get("snapshot not kept by the peer", 0) > 0
        )
        if joining.failed(self.now_ms) or moved_on:
            self._count_join(joining)
            self.joining = None
            gone = moved_on or len(joining.not_kept_by) > self.faults
            if not gone:
                # Timeouts only (a blip, slow peers): the honest peers may well serve it still.
                target = newest if newest is not None and newest.sequence > joining.checkpoint.sequence else joining.checkpoint
                self.effects.events.append(
                    f"state sync at {joining.checkpoint.sequence} stalled: no chunk came for {ATTEMPT_TIMEOUTS_MAX} request timeouts; trying {target.sequence}"
                )
                self._start_join(target)
                return
            # f + 1 peers keep no snapshot of it (one honest): never this checkpoint again. The next
            # attempt is at a newer one, or blocks are fetched (their answer brings the peer's newest
            # certificate, and with it maybe a join).
            self.join_failed_through = max(self.join_failed_through, joining.checkpoint.sequence)
            why = "peers no longer keep it"
            if newest is not None and self._join_wanted(newest):
                self.effects.events.append(f"state sync at {joining.checkpoint.sequence} abandoned: {why}; trying {newest.sequence}")
                self._start_join(newest)
            else:
                self.effects.events.append(f"state sync at {joining.checkpoint.sequence} abandoned: {why}; fetching blocks")
                self._fetch_blocks()
            return
        self._join_sends(joining.tick(self.now_ms))

    def _take_newer_checkpoints(self, joining: StateJoin) -> None:
        """Certificates peers offered instead of our snapshot (one per peer, unverified): the
        newest valid one moves the stable checkpoint, so the next attempt can be at it. A joiner
        cut off while the network moved on hears of no CHECKPOINT it could take (all too far
        ahead): this is how it learns where the network is."""
        offered = sorted(joining.fetch.newer_checkpoints.values(), key=lambda certificate: certificate.sequence, reverse=True)
        joining.fetch.newer_checkpoints.clear()  # each is checked once
        for certificate in offered:
            if certificate.sequence <= self.low:
                break
            problem = self.certificates.checkpoint_certificate_problem(certificate)
            if problem is None:
                self._make_stable(certificate)
                break
            self._reject("bad checkpoint certificate", f"offered instead of a snapshot chunk: {problem}")

    def _join_sends(self, sends: list[tuple[int, Any]]) -> None:
        for peer, message in sends:
            self.effects.send.append(Send(peer, message))

    def _on_snapshot_chunk(self, sender: int, message: SnapshotChunk) -> None:
        if self.joining is None:
            self._reject("snapshot chunk not asked for")
            return
        self._join_sends(self.joining.receive_chunk(sender, message, self.now_ms))

    def _on_join_blocks(self, sender: int, message: Blocks) -> None:
        joining = self.joining
        assert joining is not None
        block = joining.receive_blocks(sender, message.blocks)
        if block is None:
            return
        try:
            # The hash is certified; the commit certificate is stored with the block, so check it too.
            verify_certificate(
                block.header, block.certificate, self.network.identity, self.replica_keys, self.quorum, self.signatures.verify
            )
        except ChainError as error:
            self._reject("bad snapshot block", f"from replica {sender}: {error}")
            return
        self._install(joining, block)

    def _install(self, joining: StateJoin, block: Block) -> None:
        """The snapshot and its block are both certified: continue from them."""
        application = joining.application()
        self._count_join(joining)
        self.joining = None
        self.snapshots.release_all()
        self.application = application
        snapshot = application.snapshot()
        state = StateChanges(
            tuple((key, balance, nonce) for key, balance, nonce in snapshot[0]), tuple((key, value) for key, value in snapshot[1])
        )
        self.effects.installed = Installed(block, joining.checkpoint, state)
        self.height = block.height
        self.last_block_hash = block.block_hash
        # The latest stamp before the snapshot is not known: the block's own (0 for a null block).
        self.last_timestamp_ms = max(self.last_timestamp_ms, block.header.timestamp_ms)
        self.next_sequence = max(self.next_sequence, self.height + 1)
        self.height_at_last_status = self.height
        self.joined_at = block.height
        newest = self.stable_checkpoint
        self.gap_at_install = max(0, (newest.sequence if newest is not None else block.height) - block.height)
        self.counters["state syncs"] = self.counters.get("state syncs", 0) + 1
        self.effects.events.append(
            f"state sync: installed the snapshot at {block.height} ({application.entry_count()} entries); fetching the blocks after it"
        )
        if self.stable_checkpoint is not None and self.stable_checkpoint.sequence == block.height:
            self.snapshots.freeze(self.height, self.application)
            self.snapshots.stable(self.stable_checkpoint)
        # Requests watched while joining whose nonce the snapshot shows used can never execute.
        for transaction in list(self.pending.oldest(len(self.pending))):
            if self.application.check(transaction) is not None:
                self.pending.remove(transaction.transaction_id)
        self._refresh_request_timer()
        self._execute_ready()
        if self.height < self.low or max(self.peer_heights.values(), default=0) > self.height:
            self._fetch_blocks()

    def _count_join(self, joining: StateJoin) -> None:
        for reason, count in list(joining.fetch.counters.items()) + list(joining.counters.items()):
            self.counters[reason] = self.counters.get(reason, 0) + count
            if reason in JOIN_REFUSALS:
                # Logged as refusals (a peer lied or had nothing): operators and the scenario verdict see them.
                self.effects.events.append(f"rejected: {reason}: {count} during the state sync at {joining.checkpoint.sequence}")
