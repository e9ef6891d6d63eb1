"""ReplicaCore.quiet(): when the host may tick less often (node/runtime.py QUIET_TICK_MS), and
when it must not: whenever a request, a proposed batch or a view change waits on a timer."""

from __future__ import annotations

from core_network import Network


def test_a_network_is_quiet_before_any_request_and_again_once_it_executed() -> None:
    network = Network()
    assert all(core.quiet() for core in network.cores)
    network.submit(0)
    assert not network.cores[0].quiet(), "the primary holds a request to propose"
    network.tick(10)  # the primary proposes it
    network.deliver()
    assert not any(core.quiet() for core in network.cores[1:]), "the backups hold a batch not executed yet"
    network.run(1000, step_ms=10)
    assert network.heights == [1, 1, 1, 1]
    assert all(core.quiet() for core in network.cores)


def test_a_backup_timing_a_request_is_not_quiet() -> None:
    network = Network()
    backup = network.cores[1]
    transaction = network.submit(0)
    backup.receive_request(transaction)
    assert backup.request_timer_started_ms is not None
    assert not backup.quiet(), "its request timer runs"


def test_a_replica_in_a_view_change_is_not_quiet() -> None:
    network = Network()
    network.start_view_change((1,), 1)
    assert not network.cores[1].view_active and not network.cores[1].quiet()


def test_a_replica_that_knows_a_peer_is_ahead_is_not_quiet() -> None:
    network = Network()
    core = network.cores[2]
    core.peer_heights[0] = core.height + 3
    assert not core.quiet(), "it is catching up"


def test_events_are_judged_by_the_clock_the_host_advanced_not_by_the_last_tick() -> None:
    """The runtime hands a round's events to the core before it ticks; on a quiet replica the
    last tick may be 100 ms old. It advances the core's clock first (advance_clock), so a request
    is timed from when it arrived, and a pre-prepare's timestamp is compared with now (found by an
    adversarial review: at clock_skew_max_ms = 100 a quiet backup refused a fresh pre-prepare, and
    at a short view_change_timeout_ms the request timer expired in the round the request came)."""
    network = Network()
    backup = network.cores[1]
    backup.tick(1_000)
    backup.advance_clock(1_100)
    assert backup.now_ms == 1_100
    transaction = network.submit(0)
    backup.receive_request(transaction)
    assert backup.request_timer_started_ms == 1_100
    backup.advance_clock(900)  # never backwards
    assert backup.now_ms == 1_100
