"""A whole network of fake replicas in the test's own process, speaking the client protocol (framed
CBOR): each answers block-hash queries (signed with its key) and status from an honest chain, and
serves blocks from a chain of its own, so one replica can serve a tampered copy to `verify`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import trio
from chain_helpers import LedgerNetwork

from ledger.blocks import Block
from ledger.config import ProtocolSettings
from ledger.crypto import signing_domain
from ledger.encoding import CodecError
from ledger.framing import FramedStream, FrameError
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    QUERY_BEHIND,
    Blocks,
    CheckpointCertificate,
    FetchBlocks,
    Query,
    QueryReply,
    StatusQuery,
    StatusReply,
    decode_message,
    encode_message,
)


@dataclasses.dataclass
class FakeReplica:
    network: LedgerNetwork
    replica_id: int
    honest_chain: list[Block]
    served_chain: list[Block]
    port: int = 0
    checkpoint: CheckpointCertificate | None = None  # the stable checkpoint sent with every Blocks answer

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        framed = FramedStream(stream, ProtocolSettings().frame_size_max)
        try:
            async with stream:
                while (data := await framed.receive()) is not None:
                    try:
                        message = decode_message(data)
                    except CodecError:
                        continue
                    answer = self._answer(message)
                    if answer is not None:
                        await framed.send(encode_message(answer))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
            pass

    def _answer(self, message: Any) -> Any:
        height = len(self.honest_chain)
        if isinstance(message, FetchBlocks):
            start = message.from_height - 1
            return Blocks(tuple(self.served_chain[start : start + min(message.count, BLOCKS_PER_RESPONSE_MAX)]), self.checkpoint)
        if isinstance(message, StatusQuery):
            last = self.honest_chain[-1].block_hash if self.honest_chain else self.network.genesis
            return StatusReply(message.query_id, self.replica_id, 0, 0, height, last, 0, False)
        if isinstance(message, Query):
            if height < message.min_height:
                return self._signed(QueryReply(message.query_id, message.digest, self.replica_id, height, None, f"{QUERY_BEHIND} height {height}"))
            if message.kind == "block-hash" and isinstance(message.argument, int):
                result = self.honest_chain[message.argument - 1].block_hash if 1 <= message.argument <= height else None
                return self._signed(QueryReply(message.query_id, message.digest, self.replica_id, height, result, ""))
        return None  # Subscribe and anything else: a real replica would do more; verify needs no more

    def _signed(self, reply: QueryReply) -> QueryReply:
        domain = signing_domain(self.network.identity, "query-reply")
        signature = self.network.replica_signing_keys[self.replica_id].sign(domain, reply.signed_bytes())
        return dataclasses.replace(reply, signature=signature)


def write_client_config(path: Path, network: LedgerNetwork, replicas: list[FakeReplica]) -> None:
    """A client.toml naming the fake replicas' addresses, for `ledger-client -c`."""
    lines = ["[network]", f'id = "{network.network_id}"', ""]
    for replica in replicas:
        public_key = network.replica_signing_keys[replica.replica_id].public_key.hex()
        lines += [
            "[[replicas]]",
            f"id = {replica.replica_id}",
            f'public_key = "{public_key}"',
            f'address = "127.0.0.1:{replica.port}"',  # peers' port: never dialled by a client
            f'client_address = "127.0.0.1:{replica.port}"',
            "",
        ]
    for account, balance in network.balances.items():
        lines += ["[[genesis.accounts]]", f'public_key = "{account.hex()}"', f"balance = {balance}", ""]
    path.write_text("\n".join(lines))
