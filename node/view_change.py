"""View changes: VIEW-CHANGE, NEW-VIEW and entering a view (part of the pure core).

A mixin of ReplicaCore (node/core.py), which holds the state these methods read and change.
"""

from __future__ import annotations

from ledger.messages import NewView, PrePrepareHeader, ViewChange
from node.certificates import with_signature
from node.effects import Persist, Send
from node.new_view import new_view_assignments


class ViewChangeProtocol:
    """Replacing a faulty primary: announce what was prepared, compute and check NEW-VIEW."""

    def _start_view_change(self, new_view: int) -> None:
        """Leave the current view: stop normal-case work and announce what we prepared."""
        if new_view <= self.view and not (new_view == self.view and not self.view_active):
            return
        self.effects.events.append(f"view change: moving to view {new_view} (primary {self.network.primary(new_view)})")
        self.view = new_view
        self.view_active = False
        self.view_change_started_ms = None
        self.view_change_attempts += 1
        self.timed_request = None
        self.request_timer_started_ms = None
        self.new_view = None
        self.slots.clear()
        self.proposed.clear()
        self.ordering.new_view((), self.now_ms)  # between views no primary is watched
        unsigned = ViewChange(
            new_view,
            self.stable_checkpoint,
            tuple(self.prepared[sequence].certificate for sequence in sorted(self.prepared)),
            self.replica_id,
        )
        view_change = with_signature(unsigned, self.key.sign(self.domains["view-change"], unsigned.signed_bytes()))
        self.own_view_change = view_change
        self.latest_view_changes[self.replica_id] = view_change
        self.effects.persist.append(Persist("view-change", new_view, 0, view_change))
        self.effects.send.append(Send(None, view_change))
        self._check_near_view_changes()
        self._check_view_change_quorum()
        self._try_new_view()

    def _view_change_askers(self) -> int:
        """How many replicas asked for this view or a later one. A replica that already moved on
        to a later view still asked for this one: count it, or lost messages could leave the
        others short of a quorum for good."""
        return sum(1 for view_change in self.latest_view_changes.values() if view_change.new_view >= self.view)

    def _check_view_change_quorum(self) -> None:
        if self.view_active or self.view_change_started_ms is not None:
            return
        if self._view_change_askers() >= self.quorum:
            self.view_change_started_ms = self.now_ms

    def _on_view_change(self, sender: int, message: ViewChange) -> None:
        if message.new_view < self.view:
            return
        if message.new_view == self.view and self.view_active:
            # A replica that missed our NEW-VIEW is still asking for this view: answer it, once
            # per status interval (its own retransmit interval) however often it asks. A replayed
            # VIEW-CHANGE costs nothing to check (the memo knows it), but each answer is a whole
            # NEW-VIEW carrying 2f + 1 VIEW-CHANGEs: a traitor replaying a small one to the primary
            # would have it send hundreds of times the bytes (found by an adversarial review).
            if self.is_primary and self.new_view is not None and self.certificates.signed_by("view-change", message):
                answered_ms = self.new_view_answered_ms.get(message.replica_id)
                if answered_ms is None or self.now_ms - answered_ms >= self.settings.status_interval_ms:
                    self.new_view_answered_ms[message.replica_id] = self.now_ms
                    self.effects.send.append(Send(message.replica_id, self.new_view))
            return
        current = self.latest_view_changes.get(message.replica_id)
        if current is not None and current.new_view >= message.new_view:
            return
        if message.new_view <= self.refused_view_changes.get(message.replica_id, -1):
            return
        if not self.certificates.signed_by("view-change", message):
            self._reject("invalid view-change", f"from replica {message.replica_id}: bad signature")
            return
        problem = self.certificates.view_change_shape_problem(message)
        if problem is not None:
            self._refuse_view_change(message)  # its signer made it so: a traitor
            self._reject("invalid view-change", f"from replica {message.replica_id}: {problem}")
            return
        self.latest_view_changes[message.replica_id] = message
        self.unchecked_view_changes.add(message.replica_id)
        if message.new_view <= self.view + 1:
            self._check_view_change(message.replica_id)
        self._check_view_change_quorum()
        # PBFT liveness rule: f + 1 replicas want a higher view, so at least one honest one does;
        # join the lowest view among the f + 1 highest instead of waiting for our own timer. A
        # wish for a view needs only the wisher's own signature: its certificates count (and are
        # checked) once the view is near.
        higher = sorted(
            (view_change.new_view for view_change in self.latest_view_changes.values() if view_change.new_view > self.view),
            reverse=True,
        )
        if len(higher) >= self.faults + 1 and (self.view_active or higher[self.faults] > self.view):
            self._start_view_change(higher[self.faults])
        self._try_new_view()

    def _check_view_change(self, replica_id: int) -> None:
        """Check the certificates of the VIEW-CHANGE held for `replica_id`, once: it stays if they
        hold, and is refused for good if not.

        Only a VIEW-CHANGE for this view or the next is checked on arrival; one for a later view
        waits until the view comes near (_check_near_view_changes). Checked on arrival, a traitor's
        VIEW-CHANGEs for views 2, 3, 4, ... each carrying another old window of genuine
        certificates cost ~388 Ed25519 checks apiece (at n = 4, L = 128) once the history it cycles
        through outgrew the signature memo, for one signature of its own (found by an adversarial
        review). Now each costs one check, and certificates are checked once per replica per view
        the network really reaches."""
        message = self.latest_view_changes[replica_id]
        self.unchecked_view_changes.discard(replica_id)
        problem = self.certificates.view_change_certificates_problem(message)
        if problem is not None:
            del self.latest_view_changes[replica_id]
            self._refuse_view_change(message)
            self._reject("invalid view-change", f"from replica {replica_id}: {problem}")
            if self.view_change_started_ms is not None and self._view_change_askers() < self.quorum:
                # Its signer's previous VIEW-CHANGE, which this one replaced, had counted toward
                # the quorum that started the NEW-VIEW timer (a far one counted unchecked is only
                # checked when the view moves, before the quorum is counted): without it no quorum
                # asked, and a traitor must not make a replica time out alone into a view the
                # others never asked for. Its signer cannot do this twice for one view: everything
                # it sends up to this view is ignored from now on.
                self.view_change_started_ms = None
            return
        for certificate in message.prepared:
            self._check_prepared_conflicts(certificate)

    def _check_near_view_changes(self) -> None:
        """The view moved: check the VIEW-CHANGEs held unchecked that are now for this view or the next."""
        for replica_id in sorted(self.unchecked_view_changes):
            view_change = self.latest_view_changes.get(replica_id)
            if view_change is None or view_change.new_view < self.view:
                # Gone, or for a view this replica is past: it counts for nothing any more.
                self.unchecked_view_changes.discard(replica_id)
                self.latest_view_changes.pop(replica_id, None)
            elif view_change.new_view <= self.view + 1:
                self._check_view_change(replica_id)

    def _refuse_view_change(self, message: ViewChange) -> None:
        """Its signer signed a VIEW-CHANGE that does not hold: nothing more from it up to that view
        is looked at, so one traitor cannot make us check certificates for one view over and over."""
        replica_id = message.replica_id
        self.refused_view_changes[replica_id] = max(self.refused_view_changes.get(replica_id, -1), message.new_view)

    def _try_new_view(self) -> None:
        """The new primary sends NEW-VIEW once a quorum of replicas asked for its view."""
        if self.view_active or not self.is_primary:
            return
        ready = sorted(
            (view_change for view_change in self.latest_view_changes.values() if view_change.new_view == self.view),
            key=lambda view_change: view_change.replica_id,
        )
        if len(ready) < self.quorum:
            return
        chosen = tuple(ready[: self.quorum])
        _, assignments = new_view_assignments(chosen)
        # Made durable by the NEW-VIEW record that carries them, in the same write.
        headers = tuple(
            self._sign_once(
                "pre-prepare", self.view, sequence, PrePrepareHeader(self.view, sequence, digest, self.replica_id), digest, persist=False
            )
            for sequence, digest in assignments
        )
        new_view = NewView(self.view, chosen, headers, self.replica_id)
        self.effects.persist.append(Persist("new-view", self.view, 0, new_view))
        self.effects.send.append(Send(None, new_view))
        self._enter_view(new_view)

    def _on_new_view(self, sender: int, message: NewView) -> None:
        if message.view < self.view or (message.view == self.view and self.view_active):
            return
        primary = self.network.primary(message.view)
        if sender != primary:
            # A NEW-VIEW carries no signature of its own: only its primary's link vouches for it.
            self._reject("invalid new-view", f"view {message.view}: sent by replica {sender}, not the view's primary {primary}")
            return
        if message.view <= self.refused_new_views.get(sender, -1):
            return
        problem = self._new_view_problem(message)
        if problem is not None:
            # Its primary sent one that does not hold: nothing more from it up to that view is
            # looked at, or it could make us check the certificates inside over and over.
            self.refused_new_views[sender] = message.view
            self._reject("invalid new-view", f"view {message.view}: {problem}")
            return
        self.effects.persist.append(Persist("new-view", message.view, 0, message))
        self._enter_view(message)

    def _new_view_problem(self, message: NewView) -> str | None:
        primary = self.network.primary(message.view)
        if message.replica_id != primary:
            return f"sent by replica {message.replica_id}, not the view's primary {primary}"
        # First what costs one check a VIEW-CHANGE: a quorum of replicas really asked for this
        # view. Only then the certificates inside, so that a NEW-VIEW nobody asked for costs a
        # few checks, not hundreds per VIEW-CHANGE it carries.
        senders = set()
        for view_change in message.view_changes:
            if view_change.new_view != message.view or view_change.replica_id in senders:
                return "a view-change is for another view or repeated"
            if not self.certificates.signed_by("view-change", view_change):
                return f"view-change from replica {view_change.replica_id}: bad signature"
            problem = self.certificates.view_change_shape_problem(view_change)
            if problem is not None:
                return f"view-change from replica {view_change.replica_id}: {problem}"
            senders.add(view_change.replica_id)
        if len(senders) < self.quorum:
            return f"only {len(senders)} view-changes, {self.quorum} needed"
        _, expected = new_view_assignments(message.view_changes)
        received = [(header.sequence, header.digest) for header in message.pre_prepares]
        if received != expected:
            return "its pre-prepares are not the ones its view-changes imply"
        for view_change in message.view_changes:
            problem = self.certificates.view_change_certificates_problem(view_change)
            if problem is not None:
                return f"view-change from replica {view_change.replica_id}: {problem}"
        for header in message.pre_prepares:
            if header.view != message.view or header.replica_id != primary or not self.certificates.signed_by("pre-prepare", header):
                return f"pre-prepare for sequence {header.sequence} is not signed by the primary"
        return None

    def _enter_view(self, new_view: NewView) -> None:
        """Start normal operation in the NEW-VIEW's view, with its pre-prepares as the first slots."""
        self.view = new_view.view
        self.view_active = True
        self.new_view = new_view
        self.new_view_answered_ms.clear()
        self.view_timestamp_floor_ms = 0
        self.slots.clear()
        self.proposed.clear()
        self.latest_view_changes = {r: vc for r, vc in self.latest_view_changes.items() if vc.new_view > self.view}
        self._check_near_view_changes()
        self.effects.events.append(f"entered view {self.view} (primary {self.primary})")
        # New proposals go after every sequence number the NEW-VIEW assigns.
        self.next_sequence = max([self.height + 1, self.low + 1] + [header.sequence + 1 for header in new_view.pre_prepares])
        best_checkpoint = max(
            (view_change.checkpoint for view_change in new_view.view_changes if view_change.checkpoint is not None),
            key=lambda certificate: certificate.sequence,
            default=None,
        )
        if best_checkpoint is not None and best_checkpoint.sequence > self.low:
            self._make_stable(best_checkpoint)
        highest = self.low
        for header in new_view.pre_prepares:
            highest = max(highest, header.sequence)
            if header.sequence <= self.low:
                continue
            slot = self._slot(header.sequence)
            slot.pre_prepare = header
            slot.batch = self._find_batch(header.digest)
            if slot.batch is not None and header.sequence > self.height:
                # Only what is still to execute: a transaction deferred in a block we already
                # hold must stay free to be proposed again.
                self.proposed.update(transaction.transaction_id for transaction in slot.batch.transactions)
            elif header.sequence > self.height:
                self._ask_for_batch(header.digest)
            if not self.is_primary:
                self._send_prepare(slot)
            self._advance(slot)
        # Proposals continue right after the NEW-VIEW's assignments: a number left over from an
        # earlier view would leave a gap nobody fills.
        self.next_sequence = max(highest + 1, self.height + 1, self.low + 1)
        if not self.is_primary and self.ordering.enabled:
            # What waits here waits for this view's primary now, which may never have heard of it,
            # except what the NEW-VIEW's unbroken run of batches already carries.
            self.ordering.new_view(self.pending.ids(), self.now_ms)
            self._advance_ordered_run()
        self.timed_request, self.request_timer_started_ms = None, None
        self._refresh_request_timer()
