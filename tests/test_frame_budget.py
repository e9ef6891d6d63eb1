"""Send queues count a payload's bytes until it is written, and may share one budget between queues."""

from __future__ import annotations

import trio
import trio.testing

from ledger.framing import ByteBudget, FrameDecoder, FramedStream, FrameQueue


def test_a_shared_budget_bounds_several_queues_together() -> None:
    shared = ByteBudget(100)
    first = ByteBudget(80, parent=shared)
    second = ByteBudget(80, parent=shared)
    assert first.take(60)
    assert second.free() == 40 and not second.take(41)
    assert second.take(40) and shared.free() == 0
    first.give_back(60)
    assert shared.free() == 60 and first.free() == 60


async def test_bytes_stay_counted_until_written_and_are_freed_after() -> None:
    sender, receiver = trio.testing.lockstep_stream_pair()  # a write completes only as it is read
    queue = FrameQueue(16, 1000)
    shared = ByteBudget(500)
    assert queue.put(b"a" * 600)
    assert not queue.put(b"b" * 401)  # the queue's own budget
    assert queue.put(b"c" * 300, shared) and shared.used == 300
    assert not queue.put(b"d" * 201, shared)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.pump, FramedStream(sender, 1 << 20))
        await trio.testing.wait_all_tasks_blocked()
        # Taken off the queue and being written, but not read yet: still counted.
        assert queue.queued_bytes == 600 and shared.used == 300
        decoder = FrameDecoder()
        frames: list[bytes] = []
        while len(frames) < 2:
            frames += decoder.feed(await receiver.receive_some())
        await trio.testing.wait_all_tasks_blocked()
        assert [len(payload) for payload in frames] == [600, 300]
        assert queue.queued_bytes == 0 and shared.used == 0
        nursery.cancel_scope.cancel()


async def test_a_write_the_peer_never_reads_ends_the_pump_with_too_slow_and_frees_its_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pump's write that takes longer than write_timeout_s raises trio.TooSlowError (the
    runtime then drops the connection), and the bytes it held are given back."""
    sender, _receiver = trio.testing.lockstep_stream_pair()  # nobody reads: the write never completes
    queue = FrameQueue(16, 1000)
    shared = ByteBudget(500)
    assert queue.put(b"a" * 300, shared)
    started = trio.current_time()
    try:
        await queue.pump(FramedStream(sender, 1 << 20), write_timeout_s=2.0)
    except trio.TooSlowError:
        pass
    else:
        raise AssertionError("the pump returned without its write completing")
    assert trio.current_time() - started == 2.0
    assert shared.used == 0 and queue.queued_bytes == 0


def test_clearing_a_queue_gives_every_budget_back() -> None:
    queue = FrameQueue(16, 1000)
    shared = ByteBudget(500)
    assert queue.put(b"x" * 10) and queue.put(b"y" * 20, shared)
    queue.clear()
    assert queue.queued_bytes == 0 and shared.used == 0


async def test_waiting_for_room_ends_when_bytes_are_given_back_anywhere_below_the_top() -> None:
    """A client that asks for blocks again as soon as it read the last answer may be served before
    our write returned and gave the answer's bytes back: it must wait for them, not be dropped."""
    shared = ByteBudget(100)
    mine, other = ByteBudget(60, parent=shared), ByteBudget(60, parent=shared)
    assert mine.take(50) and other.take(50)
    served = trio.Event()

    async def ask_again() -> None:
        await mine.wait_for_room(60)
        served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_again)
        await trio.testing.wait_all_tasks_blocked()
        other.give_back(50)  # the shared budget has room now, but mine still holds 50 of its 60
        await trio.testing.wait_all_tasks_blocked()
        assert not served.is_set()
        mine.give_back(50)
        with trio.fail_after(5):
            await served.wait()
