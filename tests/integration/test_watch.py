"""`ledger-client watch` and `get --prefix` through the real command line: every block once, in order,
across a replica restart; a replica serving a forged block routed around; key ranges with their bounds."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from client.library import Client
from ledger.blocks import Block
from ledger.messages import KEY_PREFIX_MATCHES_MAX
from ledger.transactions import KEY_LENGTH_MAX, VALUE_LENGTH_MAX

from .fake_replicas import FakeReplica, write_client_config
from .local_network import CLIENT_COMMAND, LocalNetwork, run_client_cli, run_command
from .replica_processes import connected_client, replica_processes
from .test_cli import EXIT_USAGE, one_line_error
from .test_cli_more import (
    FAKE_NETWORK,
    HONEST_CHAIN,
    broken_parent_link,
    certificate_short_of_a_quorum,
    edited_transaction,
    wrong_result,
    wrong_state_digest,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0
EXIT_INTERRUPTED = 130


class WatchProcess:
    """A `ledger-client watch` running in the background; its stdout lines as they come."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.stderr = b""
        self.changed = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for chunk in self.process.stdout:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode() for line in complete)
            self.changed.set()
            self.changed = trio.Event()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    async def wait_until(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        while not condition(self.objects):
            assert self.process.poll() is None, f"watch exited with {self.process.returncode}: {self.stderr.decode()}"
            await self.changed.wait()


@asynccontextmanager
async def watching(config_path: Path, *arguments: str) -> AsyncIterator[WatchProcess]:
    process = await trio.lowlevel.open_process(
        [*CLIENT_COMMAND, "-c", str(config_path), "--json", "watch", *arguments],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watch = WatchProcess(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.read)
        nursery.start_soon(watch.read_stderr)
        try:
            yield watch
        finally:
            if process.poll() is None:
                process.kill()
            await process.wait()


async def put_keys(client: Client, keys: list[str]) -> int:
    height = 0
    for key in keys:
        receipt = await client.put(key, f"value of {key}")
        assert receipt.result.ok
        height = max(height, receipt.height)
    return height


async def test_watch_shows_every_block_once_in_order_across_a_replica_restart(tmp_path: Path) -> None:
    async with replica_processes(tmp_path / "net", 4) as replicas, connected_client(replicas) as client:
        with trio.fail_after(DEADLINE_S):
            written = [f"w/{index}" for index in range(6)]
            await put_keys(client, written[:2] + ["other"])
            config = replicas.client_config_path
            async with watching(config, "--from-height", "1") as blocks, watching(config, "--from-height", "1", "--prefix", "w/") as puts:
                await blocks.wait_until(lambda objects: len(objects) >= 3)
                # The primary, the replica the watch asks first, goes down; writes go on; it comes back.
                await replicas.kill(0)
                await put_keys(client, written[2:4])
                await replicas.start(0)
                last_height = await put_keys(client, written[4:])
                await blocks.wait_until(lambda objects: objects[-1]["height"] >= last_height)
                await puts.wait_until(lambda objects: len(objects) >= len(written))
                for watch in (blocks, puts):
                    watch.process.send_signal(signal.SIGINT)
                    assert await watch.process.wait() == EXIT_INTERRUPTED
            heights = [block["height"] for block in blocks.objects]
            assert heights == list(range(1, heights[-1] + 1)), heights
            assert all(block["certificate"] is not None for block in blocks.objects)
            assert [(item["key"], item["value"]) for item in puts.objects] == [(key, f"value of {key}") for key in written]
            assert len({item["transaction_id"] for item in puts.objects}) == len(written)
            chain = {block["height"]: block for block in blocks.objects}
            for item in puts.objects:
                assert chain[item["height"]]["hash"] == item["block_hash"]
                assert chain[item["height"]]["transactions"][item["index"]]["id"] == item["transaction_id"]
            assert b"Traceback" not in puts.stderr + blocks.stderr, (puts.stderr + blocks.stderr).decode()

            # --count: exactly that many blocks from --from-height, then exit 0.
            counted = await run_command([*CLIENT_COMMAND, "-c", str(config), "--json", "watch", "--from-height", "2", "--count", "3"])
            assert counted.exit_code == 0, counted.describe()
            shown = [json.loads(line) for line in counted.stdout.splitlines()]
            assert [(block["height"], block["hash"]) for block in shown] == [(height, chain[height]["hash"]) for height in (2, 3, 4)]


@asynccontextmanager
async def fake_network_with_liar(tmp_path: Path, liar: int, served: list[Block]) -> AsyncIterator[Path]:
    replicas = [
        FakeReplica(FAKE_NETWORK, replica_id, HONEST_CHAIN, served if replica_id == liar else HONEST_CHAIN)
        for replica_id in range(FAKE_NETWORK.replica_count)
    ]
    config_path = tmp_path / "client.toml"
    async with trio.open_nursery() as nursery:
        for replica in replicas:
            await nursery.start(replica.serve)
        write_client_config(config_path, FAKE_NETWORK, replicas)
        yield config_path
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (wrong_result, "do not lead to the hash of block 4 that f+1 replicas sign"),
        (wrong_state_digest, "do not lead to the hash of block 4 that f+1 replicas sign"),
        (edited_transaction, "block 2: transactions do not match the transactions root"),
        (broken_parent_link, "block 3: parent hash does not match block 2"),
        (certificate_short_of_a_quorum, f"block 2: {FAKE_NETWORK.quorum - 1} valid commit signatures, {FAKE_NETWORK.quorum} needed"),
    ],
    ids=["wrong_result", "wrong_state_digest", "edited_transaction", "broken_parent_link", "short_certificate"],
)
async def test_watch_skips_a_replica_serving_a_block_that_does_not_verify(
    tmp_path: Path, tamper: Callable[[list[Block]], list[Block]], reason: str
) -> None:
    """Replica 0, the one asked first, serves a tampered chain. `wrong_result` keeps a valid commit
    certificate (it covers the batch only): only the block hash f+1 replicas sign gives it away."""
    async with fake_network_with_liar(tmp_path, 0, tamper(HONEST_CHAIN)) as config_path:
        result = await run_command([*CLIENT_COMMAND, "-c", str(config_path), "--json", "watch", "--from-height", "1", "--count", "4"])
    assert result.exit_code == 0, result.describe()
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert [block["hash"] for block in shown] == [block.block_hash.hex() for block in HONEST_CHAIN]
    assert [[item["ok"] for item in block["transactions"]] for block in shown] == [
        [result.ok for result in block.results] for block in HONEST_CHAIN
    ]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ledger-client: watch: replica 0 served blocks that do not verify ("), result.describe()
    assert reason in lines[0] and lines[0].endswith("skipped; asking replica 1"), lines[0]


@pytest.mark.parametrize("replica_count", [4])
async def test_get_prefix_lists_what_was_put_marks_truncation_and_refuses_bad_arguments(network: LocalNetwork, client: Client) -> None:
    with trio.fail_after(DEADLINE_S):
        for key, value in [("user/bob", "2"), ("user/alice", "1"), ("users", "not under user/"), ("user/eve\n= forged", "x\x1b[2J")]:
            assert (await client.put(key, value)).result.ok
        height = client.read_floor
        text = await run_client_cli(network, "--min-height", str(height), "get", "--prefix", "user/")
        assert text.exit_code == 0, text.describe()
        # A stored line break or terminal escape is shown escaped, never obeyed.
        assert text.stdout.splitlines() == ["user/alice = 1", "user/bob = 2", "user/eve\\n= forged = x\\x1b[2J"], text.describe()
        as_json = await run_client_cli(network, "--json", "--min-height", str(height), "get", "--prefix", "user/")
        assert as_json.exit_code == 0, as_json.describe()
        data = as_json.json()
        assert data["entries"] == [
            {"key": "user/alice", "value": "1"}, {"key": "user/bob", "value": "2"}, {"key": "user/eve\n= forged", "value": "x\x1b[2J"}
        ]
        assert data["truncated"] is False and data["height"] >= height and data["prefix"] == "user/"
        empty = await run_client_cli(network, "get", "--prefix", "nobody/")
        assert empty.exit_code == 0 and empty.stdout.startswith("(no key starts with 'nobody/')"), empty.describe()

        # 13 values of 4096 characters pass the 48 KiB an answer holds: the answer says there is more.
        for index in range(13):
            assert (await client.put(f"big/{index:02d}", "v" * VALUE_LENGTH_MAX)).result.ok
        big = await run_client_cli(network, "--min-height", str(client.read_floor), "get", "--prefix", "big/")
        assert big.exit_code == 0, big.describe()
        lines = big.stdout.splitlines()
        assert lines[-1].startswith(f"... more (one answer holds at most {KEY_PREFIX_MATCHES_MAX} keys or 48 KiB"), big.describe()
        assert [line.split(" = ")[0] for line in lines[:-1]] == [f"big/{index:02d}" for index in range(len(lines) - 1)]
        assert 0 < len(lines) - 1 < 13
        big_json = await run_client_cli(network, "--json", "--min-height", str(client.read_floor), "get", "--prefix", "big/")
        assert big_json.json()["truncated"] is True and len(big_json.json()["entries"]) == len(lines) - 1

        for arguments, message in [
            (["get", "--prefix", "k" * (KEY_LENGTH_MAX + 1)], f"--prefix: {KEY_LENGTH_MAX + 1} characters, keys have at most {KEY_LENGTH_MAX}"),
            (["get", "user/bob", "--prefix", "user/"], "get: give either a KEY or --prefix PREFIX, not both"),
            (["get"], "get: give a KEY, or --prefix PREFIX for every key starting with it"),
            (["watch", "--prefix", "k" * (KEY_LENGTH_MAX + 1)], f"--prefix: {KEY_LENGTH_MAX + 1} characters, keys have at most {KEY_LENGTH_MAX}"),
            (["watch", "--account", "nobody"], "account 'nobody': expected 64 hex digits or a key file"),
        ]:
            refused = await run_client_cli(network, *arguments)
            assert one_line_error(refused, "ledger-client", EXIT_USAGE) == f"ledger-client: {message}", refused.describe()
        for arguments in (["watch", "--count", "0"], ["watch", "--from-height", "0"]):
            refused = await run_client_cli(network, *arguments)
            one_line_error(refused, "ledger-client", EXIT_USAGE)
