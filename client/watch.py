"""Following the ledger as it grows: every new block, checked before it is handed on, with no gap and no repeat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from client.library import HistoryPruned, NetworkUnavailable
from ledger.blocks import Block, ChainError, verify_chain_segment
from ledger.config import NetworkConfig

# While caught up, how long to wait before asking again whether the next block exists.
WATCH_POLL_S = 0.2
# Blocks fetched, checked and held at once: memory stays bounded however far behind the watch is.
WATCH_BLOCKS_PER_FETCH = 16


class BlockSource(Protocol):
    """What following the chain needs from a client (client.library.Client has it all)."""

    network: NetworkConfig

    @property
    def primary(self) -> int: ...

    async def block_hash_or_height(self, height: int) -> tuple[bytes | None, int]: ...

    async def confirmed_block_hash(self, height: int) -> bytes: ...

    async def fetch_blocks(self, replica_id: int, from_height: int, count: int) -> list[Block]: ...

    def verify_block(self, block: Block) -> None: ...


class BlockFollower:
    """Hands out blocks from `next_height` on, in order, each exactly once.

    One replica's blocks are enough, once checked: each block's commit certificate must verify
    against the replicas' keys, the blocks must link by parent hash to the one handed out before,
    and the last one's hash must be the one f + 1 replicas sign (the certificate covers only the
    batch, not the results, state digest or parent link; the signed hash covers the whole header,
    and through the parent links every block before it). A replica whose blocks fail is reported
    through `report` and the next one asked. The follower remembers only the next height and the
    last hash, so it resumes across a replica restart or a reconnect wherever it stopped.
    """

    def __init__(
        self,
        source: BlockSource,
        next_height: int,
        parent_hash: bytes | None,
        report: Callable[[str], None],
    ) -> None:
        if next_height < 1:
            raise ValueError("heights start at 1")
        self.source = source
        self.next_height = next_height
        # The hash of block next_height - 1 when known (genesis before block 1); else the first
        # block's parent is vouched for only through the signed hash of the last block fetched.
        self.parent_hash = parent_hash
        self.report = report
        self.vouched_height = 0  # a height f + 1 replicas reported: blocks up to it exist
        self.preferred = source.primary
        self.waiting_since_reported = False

    async def next_blocks(self) -> list[Block]:
        """The next one to WATCH_BLOCKS_PER_FETCH blocks, checked; waits until there is one."""
        while True:
            try:
                blocks = await self._try_next()
            except NetworkUnavailable as error:  # not enough replicas answer: wait, and ask again
                if not self.waiting_since_reported:
                    self.report(f"waiting for the network: {error}")
                    self.waiting_since_reported = True
                blocks = []
            if blocks:
                self.waiting_since_reported = False
                self.next_height = blocks[-1].height + 1
                self.parent_hash = blocks[-1].block_hash
                return blocks
            await trio.sleep(WATCH_POLL_S)

    async def _try_next(self) -> list[Block]:
        if self.next_height > self.vouched_height:
            expected_hash, height = await self.source.block_hash_or_height(self.next_height)
            if expected_hash is None:
                self.vouched_height = max(self.vouched_height, height)
                return []  # caught up: not there yet
            self.vouched_height = max(self.vouched_height, height, self.next_height)
            if self.vouched_height == self.next_height:
                return await self._fetch_checked(self.next_height, expected_hash)
        last = min(self.vouched_height, self.next_height + WATCH_BLOCKS_PER_FETCH - 1)
        return await self._fetch_checked(last, await self.source.confirmed_block_hash(last))

    async def _fetch_checked(self, last: int, last_hash: bytes) -> list[Block]:
        """Blocks next_height..last from the first replica whose copy checks out, or none."""
        count = last - self.next_height + 1
        replica_ids = list(range(self.source.network.replica_count))
        start = replica_ids.index(self.preferred) if self.preferred in replica_ids else 0
        order = replica_ids[start:] + replica_ids[:start]
        for position, replica_id in enumerate(order):
            try:
                blocks = (await self.source.fetch_blocks(replica_id, self.next_height, count))[:count]
            except NetworkUnavailable:
                continue  # down or restarting: another replica has the same blocks
            except HistoryPruned:
                continue  # it no longer keeps them (retain_blocks): another replica may
            if len(blocks) < count or blocks[0].height != self.next_height:
                continue  # behind, or an answer to an earlier request: not a lie, just no use
            try:
                self._check(blocks, last_hash)
            except ChainError as error:
                then = f"; asking replica {order[position + 1]}" if position + 1 < len(order) else ""
                self.report(f"replica {replica_id} served blocks that do not verify ({error}), skipped{then}")
                continue
            self.preferred = replica_id
            return blocks
        return []

    def _check(self, blocks: list[Block], last_hash: bytes) -> None:
        parent = self.parent_hash if self.parent_hash is not None else blocks[0].header.parent_hash
        verify_chain_segment(blocks, parent, self.next_height - 1)  # heights, links, transaction and result roots
        for block in blocks:
            self.source.verify_block(block)
        if blocks[-1].block_hash != last_hash:
            raise ChainError(
                f"blocks {self.next_height} to {blocks[-1].height} do not lead to the hash of block "
                f"{blocks[-1].height} that f+1 replicas sign (results, state digest or a parent link altered)"
            )
