"""The ordering watch (node/ordering_monitor.py): backups replace a primary that leaves requests
unordered while it has room to propose, long before the request timer would, and no client can
make them suspect an honest primary by sending its requests to the backups only."""

from __future__ import annotations

import dataclasses
from typing import Any

from core_network import Network

from ledger.messages import Batch, Commit, PrePrepare, Request
from ledger.transactions import Put, Transaction, sign_transaction
from node.ordering_monitor import OrderingMonitor

STEP_MS = 10


def real_timers(network: Network) -> None:
    """The default timers of a real network (request timer 3 s, ordering timer 500 ms)."""
    for core in network.cores:
        core.settings = dataclasses.replace(core.settings, view_change_timeout_ms=3_000, ordering_timeout_ms=500, status_interval_ms=500)
        core.ordering = OrderingMonitor(500)


def multicast(network: Network, transaction: Transaction, replicas: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """As the client library sends a request: to every replica (or, for an attack, to some)."""
    for index in replicas:
        network.cores[index].tick(network.now_ms)
        network.cores[index].receive_request(transaction)
        network.collect(index)


def put(network: Network, nonce: int) -> Transaction:
    return sign_transaction(network.config.identity, network.client, nonce, Put("key", str(nonce)))


def run_until(network: Network, done: Any, limit_ms: int, drop: Any = None) -> int:
    """Tick and deliver in STEP_MS steps until done() holds; the logical time it took."""
    started = network.now_ms
    while not done():
        assert network.now_ms - started < limit_ms, "not within the limit"
        network.tick(STEP_MS)
        network.deliver(drop)
    return network.now_ms - started


def committed_everywhere(network: Network, height: int) -> Any:
    return lambda: all(network.heights[index] >= height for index in range(4) if index not in network.down)


def withheld_pre_prepares(sender: int, receiver: int, message: Any) -> bool:
    return sender == 0 and isinstance(message, PrePrepare)


def test_the_timer_waits_until_armed_relays_at_half_and_expires_at_its_timeout() -> None:
    monitor = OrderingMonitor(200)
    first, second = b"a" * 32, b"b" * 32
    monitor.heard(first, 0)
    monitor.heard(second, 400)
    assert monitor.step(0, True) is None
    assert monitor.step(100, True) == "relay"
    assert monitor.step(300, True) is None and monitor.timer_waited_ms == 100, "not armed: relayed, never suspected"
    monitor.pre_prepare_arrived()
    assert monitor.step(310, False) is None, "a busy primary is not timed"
    assert monitor.step(320, True) is None and monitor.timer_waited_ms == 100, "busy time paused the timer"
    assert monitor.due_for_relay(420, 0, 10) == [first, second]
    assert monitor.step(419, True) is None
    monitor.ordered(first)
    assert monitor.step(460, True) is None and monitor.timer_waited_ms == 60, "the next one, from its arrival"
    assert monitor.step(500, True) == "relay" and monitor.step(599, True) is None
    assert monitor.step(600, True) == "expired"
    monitor.ordered(second)
    assert len(monitor) == 0 and monitor.step(700, True) is None


def test_a_flash_of_busy_pauses_the_timer_and_never_restarts_it() -> None:
    """Found by an adversarial review: a busy moment reset the timer, so a primary that proposed
    two empty batches every 400 ms held every request for 2.7 s unreplaced."""
    monitor = OrderingMonitor(500)
    monitor.pre_prepare_arrived()
    monitor.heard(b"a" * 32, 0)
    outcomes = []
    for now_ms in range(0, 1_000, 10):
        busy = now_ms % 400 < 20  # two batches in flight for 20 ms of every 400
        outcomes.append(monitor.step(now_ms, not busy))
        if "expired" in outcomes:
            break
    assert "expired" in outcomes and now_ms < 600


def test_requests_waiting_long_are_relayed_once_even_to_a_busy_primary() -> None:
    monitor = OrderingMonitor(200)
    monitor.heard(b"a" * 32, 0)
    monitor.heard(b"b" * 32, 100)
    assert monitor.due_for_relay(250, 200, 10) == [b"a" * 32]
    assert monitor.due_for_relay(260, 200, 10) == [], "relayed once"
    assert monitor.due_for_relay(300, 200, 10) == [b"b" * 32]
    assert list(monitor.relayed.items()) == [(b"a" * 32, 0), (b"b" * 32, 100)], "each keeps its arrival"


def test_the_watch_holds_a_bounded_number_of_requests() -> None:
    monitor = OrderingMonitor(200, watched_max=3)
    for index in range(10):
        monitor.heard(bytes([index]) * 32, index)
    assert len(monitor) == 3 and list(monitor.fresh) == [bytes([index]) * 32 for index in (7, 8, 9)]


def test_a_primary_that_holds_its_pre_prepares_is_replaced_by_the_ordering_timer() -> None:
    """The slow-primary attack: the primary proposes, but its pre-prepares come late. The request
    timer (500 ms here) allowed it to hold each for 450 ms for good; the ordering timer (200 ms)
    replaces it, and the request is committed in the next view."""
    network = Network()
    multicast(network, put(network, 0))
    run_until(network, committed_everywhere(network, 1), 1_000)
    assert all(core.ordering.armed for core in network.cores[1:])
    multicast(network, put(network, 1))
    waited = run_until(network, lambda: all(core.view >= 1 for core in network.cores[1:]), 1_000, withheld_pre_prepares)
    settings = network.config.protocol
    assert waited < settings.view_change_timeout_ms, "the ordering timer, not the request timer"
    assert waited >= settings.ordering_timeout_ms
    assert all(core.ordering.expirations == 1 for core in network.cores[1:])
    network.down.add(0)
    run_until(network, committed_everywhere(network, 2), 3_000)


def test_a_primary_proposing_promptly_is_never_suspected() -> None:
    network = Network()
    for nonce in range(20):
        multicast(network, put(network, nonce))
        network.tick(STEP_MS)
        network.deliver()
    run_until(network, committed_everywhere(network, 1), 2_000)
    run_until(network, lambda: all(not core.pending for core in network.cores), 2_000)
    assert all(core.view == 0 and core.ordering.expirations == 0 for core in network.cores)


def test_a_client_reaching_only_the_backups_cannot_get_an_honest_primary_replaced() -> None:
    """A client that sends its request to the backups alone: the primary never heard of it. The
    backups relay it at half the ordering timeout, so the idle, honest primary orders it."""
    network = Network()
    multicast(network, put(network, 0))
    run_until(network, committed_everywhere(network, 1), 1_000)
    transaction = put(network, 1)
    multicast(network, transaction, replicas=(1, 2, 3))
    relayed: list[int] = []

    def watch_relays(sender: int, receiver: int, message: Any) -> bool:
        if isinstance(message, Request) and receiver == 0:
            relayed.append(network.now_ms)
        return False

    run_until(network, committed_everywhere(network, 2), 2_000, watch_relays)
    assert relayed, "the backups relayed it"
    assert all(core.view == 0 and core.ordering.expirations == 0 for core in network.cores)


def test_a_client_reaching_only_the_backups_of_a_busy_primary_gets_relayed_in_time() -> None:
    """While batches are in flight the ordering timer does not run; a request the primary never
    got is still relayed once it waited half the request timer, before that timer expires."""
    network = Network()
    multicast(network, put(network, 0))
    run_until(network, committed_everywhere(network, 1), 1_000)
    network.cores[1].ordering.heard(b"x" * 32, network.now_ms)  # stale: dropped from the front
    transaction = put(network, 1)
    multicast(network, transaction, replicas=(1, 2, 3))
    backup = network.cores[1]
    # Keep the primary's room closed as the backup sees it: two batches in flight, never executed.
    backup._primary_has_room = lambda: False  # type: ignore[method-assign]
    relays: list[Any] = []
    for _ in range(backup._timeout_ms() // STEP_MS):
        network.now_ms += STEP_MS
        backup.tick(network.now_ms)
        relays += [send for send in backup.take_effects().send if isinstance(send.message, Request)]
        if relays:
            break
    assert [send.to for send in relays] == [0] and relays[0].message.transaction == transaction
    assert backup.view == 0, "relayed before its request timer expired"


def test_with_the_watch_off_a_backup_relays_a_request_at_once_as_in_pbft() -> None:
    network = Network()
    backup = network.cores[1]
    backup.ordering = OrderingMonitor(0)
    backup.receive_request(put(network, 0))
    sends = backup.take_effects().send
    assert [(send.to, type(send.message)) for send in sends] == [(0, Request)]


def test_a_new_primary_is_judged_only_once_it_proposed_in_its_view() -> None:
    """A new primary first fetches the batches its view starts with; until its first pre-prepare
    of the view arrives, the ordering timer does not run (the view-change machinery's own timers
    cover a new primary that never gets going)."""
    network = Network()
    multicast(network, put(network, 0))
    run_until(network, committed_everywhere(network, 1), 1_000)
    network.down.add(0)
    multicast(network, put(network, 1), replicas=(1, 2, 3))
    network.start_view_change((1, 2, 3), 1)
    backup = network.cores[2]

    def new_primary_silent(sender: int, receiver: int, message: Any) -> bool:
        return sender == 1 and isinstance(message, PrePrepare)

    run_until(network, lambda: backup.view == 1 and backup.view_active, 1_000, new_primary_silent)
    for _ in range((network.config.protocol.ordering_timeout_ms + 100) // STEP_MS):  # its pre-prepares lost
        network.tick(STEP_MS)
        network.deliver(new_primary_silent)
    assert not backup.ordering.armed and backup.ordering.expirations == 0 and backup.view == 1
    run_until(network, committed_everywhere(network, 2), 3_000)
    assert backup.ordering.armed and backup.view == 1


def test_a_pre_prepare_held_behind_a_gap_is_caught() -> None:
    """Found by an adversarial review: a primary carried every request promptly in a pre-prepare,
    but held the one for the sequence below them for 2.7 s and proposed two empty batches after
    it. The backups saw two batches in flight (no room) and every request carried, so only the
    request timer was left, and the primary stayed under it: median latency 4.5 s, no view change.
    Now only the unbroken run above the height counts, and the primary is replaced."""
    network = Network()
    real_timers(network)
    primary = network.cores[0]
    held: dict[int, int] = {}
    stash: list[Any] = []
    for step in range(300):
        if step % 5 == 0:
            multicast(network, put(network, step // 5))
        network.tick(STEP_MS)
        for sender, _, message in list(network.queue):
            if sender == 0 and isinstance(message, PrePrepare) and message.sequence > primary.height and not held and primary.view == 0:
                held[message.sequence] = network.now_ms + 2_700
                for _ in range(2):
                    primary._propose(Batch(0, 0, primary._proposal_timestamp(), ()))
                    network.collect(0)
        is_held = [entry for entry in network.queue if entry[0] == 0 and isinstance(entry[2], PrePrepare) and entry[2].sequence in held]
        stash += is_held
        network.queue = [entry for entry in network.queue if entry not in is_held]
        network.deliver()
        if all(core.view >= 1 for core in network.cores[1:]):
            break
    assert all(core.view >= 1 for core in network.cores[1:]), "replaced"
    assert network.now_ms < 2_000, "by the ordering timer, well before the held pre-prepare"
    assert all(core.ordering.expirations >= 1 for core in network.cores[1:])


def test_a_primary_holding_one_clients_requests_while_serving_others_is_caught() -> None:
    """Found by an adversarial review: any pre-prepare restarted the timer, so a primary that
    ordered another client's steady traffic at once could hold client X's requests for 2.7 s each
    and was never replaced. Now the timer runs for the oldest waiting request until it is carried."""
    network = Network()
    real_timers(network)
    primary = network.cores[0]
    censored = network.other.public_key
    propose = primary._propose_batches

    def holding_x() -> None:
        young = [t for t in primary.pending.of_account(censored) if primary.now_ms - primary.pending.arrived_ms(t.transaction_id) < 2_700]
        arrivals = {t.transaction_id: primary.pending.arrived_ms(t.transaction_id) for t in young}
        for transaction in young:
            primary.pending.remove(transaction.transaction_id)
        propose()
        for transaction in young:
            primary.pending.add(transaction, arrivals[transaction.transaction_id], None)

    primary._propose_batches = holding_x  # type: ignore[method-assign]
    nonces = [0, 0]
    for step in range(300):
        if step % 5 == 0:
            for who, key in ((0, network.client), (1, network.other)):
                if who == 1 and step % 100:
                    continue  # X: one request a second; the other client: 20 a second
                multicast(network, sign_transaction(network.config.identity, key, nonces[who], Put("key", str(nonces[who]))))
                nonces[who] += 1
        network.tick(STEP_MS)
        network.deliver()
        if all(core.view >= 1 for core in network.cores[1:]):
            break
    assert all(core.view >= 1 for core in network.cores[1:]) and network.now_ms < 1_500


def test_a_request_first_seen_in_a_pre_prepare_behind_a_gap_is_still_watched() -> None:
    """Found by an adversarial review: a primary put R at sequence 2 and never sent 1; the
    pre-prepare reached the backups before the client's copy of R, and a backup watched nothing
    it saw proposed, so R waited 2.8 s with no suspicion. Now only the unbroken run counts."""
    network = Network()
    real_timers(network)
    primary = network.cores[0]
    primary._propose_batches = lambda: None  # type: ignore[method-assign]  # it proposes only by hand
    network.run(200, STEP_MS)
    transaction = put(network, 0)
    stamp = primary._proposal_timestamp()
    primary.next_sequence = 2  # sequence 1 stays a gap
    primary._propose(Batch(0, 0, stamp, (transaction,)))
    network.collect(0)
    network.deliver()
    multicast(network, transaction, replicas=(1, 2, 3))  # the client's copy, just after
    assert all(len(core.ordering) == 1 for core in network.cores[1:])
    run_until(network, lambda: all(core.view >= 1 for core in network.cores[1:]), 1_000)


def test_cross_delivered_pre_prepares_with_the_primarys_own_commits_do_not_pause_the_timer() -> None:
    """Found by an adversarial review: a primary sent one slot's pre-prepare to backup 1 only and
    the next one's to backups 2 and 3 only, each with its own COMMIT to the backups that lacked
    it; every backup then counted f + 1 votes on a pre-prepare it missed, paused as if behind,
    and requests waited 2.7 s unreplaced. The primary's own votes no longer count."""
    network = Network()
    real_timers(network)
    primary = network.cores[0]
    hidden: dict[int, tuple[int, ...]] = {}
    real_propose = primary._propose_batches

    def stuck_pairs() -> None:
        if hidden:
            return  # holds everything while the pair is stuck
        real_propose()
        if primary._batches_in_flight() or primary.next_sequence + 1 > min(primary.high, primary.height + primary.settings.window_size):
            return
        for targets in ((2, 3), (1,)):
            sequence = primary.next_sequence
            primary._propose(Batch(primary.view, primary.replica_id, primary._proposal_timestamp(), ()))
            hidden[sequence] = targets
            digest = primary.slots[sequence].pre_prepare.digest  # type: ignore[union-attr]
            commit = primary._sign_once("commit", primary.view, sequence, Commit(primary.view, sequence, digest, 0), digest)
            network.queue.extend((0, target, commit) for target in targets)

    primary._propose_batches = stuck_pairs  # type: ignore[method-assign]

    def withheld(sender: int, receiver: int, message: Any) -> bool:
        return sender == 0 and isinstance(message, PrePrepare) and receiver in hidden.get(message.sequence, ())

    nonce = 0
    for step in range(200):
        if step % 10 == 0:
            multicast(network, put(network, nonce))
            nonce += 1
        network.tick(STEP_MS)
        network.deliver(withheld)
        if sum(core.view >= 1 for core in network.cores[1:]) >= 2:
            break
    assert sum(core.view >= 1 for core in network.cores[1:]) >= 2 and network.now_ms < 1_500, "replaced"


def test_a_full_batch_in_flight_means_the_primary_is_busy() -> None:
    """At 1,024 in flight (n = 4, real processes) one backup suspected an honest primary: batches
    were full, replicas saw requests in different orders, and its oldest request waited a batch or
    two. A full batch in flight now counts as a busy primary."""
    network = Network()
    batch_size_max = network.config.protocol.batch_size_max
    for nonce in range(batch_size_max):  # in one round: the primary proposes one full batch
        transaction = put(network, nonce)
        for index in range(4):
            network.cores[index].receive_request(transaction)
            network.collect(index)

    def votes_lost(sender: int, receiver: int, message: Any) -> bool:
        return not isinstance(message, PrePrepare)  # it stays in flight

    network.deliver(votes_lost)
    backup = network.cores[1]
    assert len(backup.slots[1].batch.transactions) == batch_size_max  # type: ignore[union-attr]
    multicast(network, put(network, batch_size_max), replicas=(1,))
    assert len(backup.ordering) == 1 and not backup._primary_owes_a_proposal()
