"""The watch loop (client/watch.py) against a scripted source: bounded segments, no gap and no repeat
through outages, a lying replica skipped, and no busy loop while caught up."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
from chain_helpers import build_chain, make_network

from client.library import HistoryPruned, NetworkUnavailable
from client.watch import WATCH_BLOCKS_PER_FETCH, WATCH_POLL_S, BlockFollower
from ledger.blocks import Block, verify_certificate

NETWORK = make_network("watch-follower")
CHAIN = build_chain(NETWORK, 60, transactions_per_block=1)


@dataclasses.dataclass(eq=False)
class ScriptedSource:
    """Replicas that serve CHAIN up to `height` (a liar serves `forged` instead), asked through the
    same calls a Client answers; `down` replicas and `outage` fail as an unreachable network does."""

    height: int
    down: set[int] = dataclasses.field(default_factory=set)
    forged: dict[int, list[Block]] = dataclasses.field(default_factory=dict)
    pruned_below: dict[int, int] = dataclasses.field(default_factory=dict)  # replica -> the first block it keeps
    outage: bool = False
    queries: int = 0
    fetches: int = 0
    # (how many queries, event): set once that many queries were asked, so a test waits for the
    # follower's polls themselves instead of sleeping.
    query_waiters: list[tuple[int, trio.Event]] = dataclasses.field(default_factory=list)
    network = NETWORK.config
    primary = 0

    async def wait_for_queries(self, count: int) -> None:
        event = trio.Event()
        self.query_waiters.append((count, event))
        self._wake()
        await event.wait()

    def _wake(self) -> None:
        for count, event in self.query_waiters:
            if self.queries >= count:
                event.set()

    def _query(self) -> None:
        self.queries += 1
        self._wake()
        if self.outage:
            raise NetworkUnavailable("no 2 matching answers to 'block-hash' within 15s")

    async def block_hash_or_height(self, height: int) -> tuple[bytes | None, int]:
        self._query()
        return (CHAIN[height - 1].block_hash if height <= self.height else None), self.height

    async def confirmed_block_hash(self, height: int) -> bytes:
        self._query()
        assert height <= self.height
        return CHAIN[height - 1].block_hash

    async def fetch_blocks(self, replica_id: int, from_height: int, count: int) -> list[Block]:
        self.fetches += 1
        if self.outage or replica_id in self.down:
            raise NetworkUnavailable(f"replica {replica_id} did not answer a block request")
        if from_height < self.pruned_below.get(replica_id, 0):
            raise HistoryPruned(f"replica {replica_id} refused block {from_height}: pruned", self.pruned_below[replica_id])
        chain = self.forged.get(replica_id, CHAIN)[: self.height]
        return chain[from_height - 1 : from_height - 1 + count]

    def verify_block(self, block: Block) -> None:
        verify_certificate(block.header, block.certificate, NETWORK.config.identity, NETWORK.config.replica_keys, NETWORK.quorum)


async def follow(follower: BlockFollower, through: int) -> list[Block]:
    shown: list[Block] = []
    while not shown or shown[-1].height < through:
        blocks = await follower.next_blocks()
        assert len(blocks) <= WATCH_BLOCKS_PER_FETCH
        shown.extend(blocks)
    return shown


async def test_a_follower_far_behind_catches_up_in_bounded_segments_then_waits_for_the_next_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = ScriptedSource(height=40, down={0})  # the replica asked first is down
    reports: list[str] = []
    follower = BlockFollower(source, 1, NETWORK.genesis, reports.append)
    shown = await follow(follower, 40)
    assert [block.height for block in shown] == list(range(1, 41))
    assert reports == []  # a replica that is down is not a lie: nothing to report
    # Caught up: it asks again every WATCH_POLL_S, no faster, until block 41 exists.
    asked, started = source.queries, trio.current_time()
    async with trio.open_nursery() as nursery:

        async def commit_later() -> None:
            await source.wait_for_queries(asked + 10)  # ten polls while caught up, then block 41
            source.height = 41

        nursery.start_soon(commit_later)
        assert [block.height for block in await follower.next_blocks()] == [41]
    assert source.queries - asked <= (trio.current_time() - started) / WATCH_POLL_S + 2


async def test_a_follower_resumes_after_an_outage_with_no_gap_and_no_repeat(autojump_clock: trio.testing.MockClock) -> None:
    source = ScriptedSource(height=5)
    reports: list[str] = []
    follower = BlockFollower(source, 3, None, reports.append)
    shown = await follow(follower, 5)
    source.outage, source.height = True, 30  # the network goes away while blocks 6..30 commit

    async def restore() -> None:
        await source.wait_for_queries(source.queries + 25)  # many polls fail during the outage
        source.outage = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restore)
        shown += await follow(follower, 30)
    assert [block.height for block in shown] == list(range(3, 31))
    assert reports == ["waiting for the network: no 2 matching answers to 'block-hash' within 15s"]  # said once, not every poll


async def test_a_follower_skips_a_replica_whose_blocks_do_not_lead_to_the_signed_hash(autojump_clock: trio.testing.MockClock) -> None:
    # Replica 0 alters block 12's state digest and relinks its successors: every certificate still
    # verifies (they cover the batch only) and the links hold, but the hash chain no longer ends
    # at the block hash f + 1 replicas sign.
    forged = list(CHAIN)
    forged[11] = dataclasses.replace(CHAIN[11], header=dataclasses.replace(CHAIN[11].header, state_digest=bytes(32)))
    for index in range(12, len(forged)):
        forged[index] = dataclasses.replace(forged[index], header=dataclasses.replace(forged[index].header, parent_hash=forged[index - 1].block_hash))
    source = ScriptedSource(height=20, forged={0: forged})
    reports: list[str] = []
    follower = BlockFollower(source, 10, None, reports.append)
    shown = await follow(follower, 20)
    assert [block.block_hash for block in shown] == [block.block_hash for block in CHAIN[9:20]]
    assert len(reports) == 1 and reports[0].startswith("replica 0 served blocks that do not verify (blocks 10 to 20 do not lead"), reports
    assert reports[0].endswith("skipped; asking replica 1")
    # The replica that served good blocks is asked first from then on: no more reports.
    source.height = 25
    assert [block.height for block in await follow(follower, 25)] == list(range(21, 26))
    assert len(reports) == 1


async def test_a_follower_skips_a_replica_that_pruned_the_blocks_it_needs(autojump_clock: trio.testing.MockClock) -> None:
    """Regression: a replica refusing a fetch as pruned (retain_blocks) ended the watch with an
    error although the other replicas keep those blocks."""
    source = ScriptedSource(height=20, pruned_below={0: 15})
    reports: list[str] = []
    follower = BlockFollower(source, 10, None, reports.append)
    shown = await follow(follower, 20)
    assert [block.height for block in shown] == list(range(10, 21)) and reports == []
