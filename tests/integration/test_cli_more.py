"""More of `ledger-client` and `ledger-node` through their real command lines: transaction id
prefixes, duplicate replica identities, every documented exit code, what `verify` names when a
replica serves a bad chain, and --version."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from unittest import mock

import pytest
import trio
from chain_helpers import build_executed_chain, make_network, sign_certificate

from ledger.blocks import Block, results_root
from ledger.config import template_for, write_network
from ledger.crypto import SigningKey, write_key_file
from ledger.transactions import Put, TransactionResult, sign_transaction

from .fake_replicas import FakeReplica, write_client_config
from .local_network import (
    CLIENT_COMMAND,
    NODE_COMMAND,
    CommandResult,
    LocalNetwork,
    pick_base_port,
    run_client_cli,
    run_command,
)
from .test_cli import EXIT_FAILED, EXIT_INVALID_CHAIN, EXIT_UNAVAILABLE, EXIT_USAGE, one_line_error

pytestmark = pytest.mark.integration

# Signatures bind the genesis hash, which pins the replicas' keys: so that a colliding pair can be
# found once, this test's network has fixed keys (replica i and then the client get the seed byte
# i repeated). Two puts of this key then have transaction ids sharing their first 8 hex digits
# (found by signing ~32,000 values; Ed25519 signatures are deterministic, so they always do).
COLLIDING_SEED = bytes(range(32))
COLLIDING_PUTS = ((0, Put("k", "a16237")), (1, Put("k", "b15012")))
COLLIDING_GENESIS = "07065d1afdb9698d837ae46b482c47c443699e06e40244f490d86d0c64dcde7c"


@pytest.fixture
async def fixed_key_network(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[LocalNetwork]:
    """A running 4-replica network whose keys (and so genesis hash) are the same in every run."""
    local = LocalNetwork(tmp_path / "net", 4, nursery)
    seeds = itertools.count()
    base_port = pick_base_port(4, random.Random())
    with mock.patch.object(SigningKey, "generate", lambda: SigningKey.from_private_bytes(bytes([next(seeds)]) * 32)):
        write_network(template_for(4, base_port=base_port), local.directory)
    local.base_port = base_port
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


async def test_tx_accepts_a_unique_prefix_and_names_an_unknown_or_ambiguous_one(fixed_key_network: LocalNetwork, tmp_path: Path) -> None:
    """Regression: `tx` took only all 64 hex digits of an id."""
    network = fixed_key_network
    assert network.network.genesis_hash.hex() == COLLIDING_GENESIS
    key = SigningKey.from_private_bytes(COLLIDING_SEED)
    key_path = tmp_path / "colliding.key"
    write_key_file(key_path, key)
    transactions = [sign_transaction(network.network.identity, key, nonce, put) for nonce, put in COLLIDING_PUTS]
    shared = transactions[0].transaction_id.hex()[:8]
    assert transactions[1].transaction_id.hex()[:8] == shared
    for _, put in COLLIDING_PUTS:
        result = await run_client_cli(network, "--key", str(key_path), "put", put.key, put.value)
        assert result.exit_code == 0, result.describe()

    unique = transactions[1].transaction_id.hex()
    for prefix in (unique[:9], unique[:12].upper(), unique[:63], unique):
        found = await run_client_cli(network, "--json", "tx", prefix)
        assert found.exit_code == 0, found.describe()
        assert found.json()["transaction_id"] == unique and found.json()["found"], found.describe()

    ambiguous = await run_client_cli(network, "tx", shared)
    line = one_line_error(ambiguous, "ledger-client", EXIT_FAILED)
    assert f"prefix {shared} matches 2 transactions" in line, line

    unknown_prefix = "0123abcd" if shared != "0123abcd" else "fedc4321"
    unknown = await run_client_cli(network, "tx", unknown_prefix)
    line = one_line_error(unknown, "ledger-client", EXIT_FAILED)
    assert f"no transaction starts with {unknown_prefix}" in line, line

    unknown_id = await run_client_cli(network, "tx", "ab" * 32)
    assert unknown_id.exit_code == EXIT_FAILED and "no such transaction" in unknown_id.stdout, unknown_id.describe()

    too_short = await run_client_cli(network, "tx", unique[:7])
    assert "8 or more" in one_line_error(too_short, "ledger-client", EXIT_USAGE)


# ---- a duplicate replica identity ----

DUPLICATE_DEADLINE_S = 30.0


@pytest.mark.parametrize("replica_count", [4])
async def test_a_second_process_with_a_replicas_key_is_logged_and_shown_in_status(network: LocalNetwork, tmp_path: Path) -> None:
    """Regression: a copy of replica 3 (same key, another address) connected to its peers unnoticed:
    each peer kept one set entry for both connections and dropped it when either closed."""
    replica = network.network.replicas[3]
    text = network.replica_config_path(3).read_text()
    for address in (replica.address, replica.client_address):
        assert f'"{address}"' in text
        text = text.replace(f'"{address}"', f'"127.0.0.2:{address.port}"')
    text = text.replace('key_file = "replica-3.key"', f'key_file = "{network.replica_key_path(3)}"')
    text = text.replace('data_dir = "data/replica-3"', f'data_dir = "{tmp_path / "copy-data"}"')
    # The copy serves its metrics on the other address too: the original holds 127.0.0.1's port.
    assert '[metrics]\nhost = "127.0.0.1"' in text
    text = text.replace('[metrics]\nhost = "127.0.0.1"', '[metrics]\nhost = "127.0.0.2"')
    copy_path = tmp_path / "copy-of-replica-3.toml"
    copy_path.write_text(text)
    with (tmp_path / "copy.log").open("wb") as copy_log:
        copy = subprocess.Popen([*NODE_COMMAND, "run", str(copy_path)], stdout=copy_log, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(DUPLICATE_DEADLINE_S):
            while "two connections claim replica 3: from 127.0.0.1:" not in network.log_text(0):
                assert copy.poll() is None, (tmp_path / "copy.log").read_text()
                await trio.sleep(0.05)
        line = next(line for line in network.log_text(0).splitlines() if "two connections claim replica 3" in line)
        assert line.count("127.0.0.1:") == 2, line  # both addresses named
        with trio.fail_after(DUPLICATE_DEADLINE_S):
            while True:
                status = await run_client_cli(network, "--json", "status")
                assert status.exit_code == 0, status.describe()
                if status.json()["replicas"][0]["duplicate_identities"] == {"3": 2}:
                    break
                await trio.sleep(0.05)
        shown = await run_client_cli(network, "status")
        assert "warning: replica 3's key is in use by more than one process (connections from it: 2 at replica 0" in shown.stdout, shown.describe()
    finally:
        copy.terminate()
        copy.wait(timeout=20)
    # Once the copy is gone, the honest replica 3 is still connected and the warning clears.
    with trio.fail_after(DUPLICATE_DEADLINE_S):
        while True:
            status = await run_client_cli(network, "--json", "status")
            if status.exit_code == 0 and all(item["duplicate_identities"] == {} for item in status.json()["replicas"]):
                break
            await trio.sleep(0.05)


# ---- every documented exit code, and what `verify` names when a replica serves a bad chain ----

FAKE_NETWORK = make_network("fake-verify")
HONEST_CHAIN = build_executed_chain(FAKE_NETWORK, 4)
SERVING_REPLICA = 2  # the replica whose chain `verify --replica` downloads


def relinked(chain: list[Block], start: int) -> list[Block]:
    """The chain with parent hashes recomputed from index `start` on: commit certificates cover
    the batch, not the parent link, so a tampered block's successors still verify on their own."""
    blocks = list(chain)
    for index in range(max(start, 1), len(blocks)):
        header = dataclasses.replace(blocks[index].header, parent_hash=blocks[index - 1].block_hash)
        blocks[index] = dataclasses.replace(blocks[index], header=header)
    return blocks


def with_block(chain: list[Block], index: int, block: Block) -> list[Block]:
    return relinked([*chain[:index], block, *chain[index + 1 :]], index + 1)


def edited_transaction(chain: list[Block]) -> list[Block]:
    forged = sign_transaction(FAKE_NETWORK.identity, FAKE_NETWORK.client_key, 3, Put("key-3", "forged"))
    block = chain[1]
    return with_block(chain, 1, dataclasses.replace(block, transactions=(forged, *block.transactions[1:])))


def wrong_state_digest(chain: list[Block]) -> list[Block]:
    header = dataclasses.replace(chain[1].header, state_digest=bytes(32))
    return with_block(chain, 1, dataclasses.replace(chain[1], header=header))


def wrong_result(chain: list[Block]) -> list[Block]:
    results = (TransactionResult(False, "forged"), *chain[1].results[1:])
    header = dataclasses.replace(chain[1].header, results_root=results_root(results))
    return with_block(chain, 1, dataclasses.replace(chain[1], header=header, results=results))


def broken_parent_link(chain: list[Block]) -> list[Block]:
    header = dataclasses.replace(chain[2].header, parent_hash=bytes(32))
    return with_block(chain, 2, dataclasses.replace(chain[2], header=header))


def certificate_short_of_a_quorum(chain: list[Block]) -> list[Block]:
    certificate = sign_certificate(FAKE_NETWORK, chain[1].header, signers=range(FAKE_NETWORK.quorum - 1))
    return with_block(chain, 1, dataclasses.replace(chain[1], certificate=certificate))


def truncated(chain: list[Block]) -> list[Block]:
    return chain[:2]


@asynccontextmanager
async def fake_network(tmp_path: Path, served_chain: list[Block]) -> AsyncIterator[tuple[Path, trio.CancelScope]]:
    """Fake replicas answering from HONEST_CHAIN, SERVING_REPLICA serving `served_chain`; yields
    their client.toml and a scope that stops them all."""
    replicas = [
        FakeReplica(FAKE_NETWORK, replica_id, HONEST_CHAIN, served_chain if replica_id == SERVING_REPLICA else HONEST_CHAIN)
        for replica_id in range(FAKE_NETWORK.replica_count)
    ]
    config_path = tmp_path / "client.toml"
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as servers:
            for replica in replicas:
                await nursery.start(replica.serve)
            write_client_config(config_path, FAKE_NETWORK, replicas)
            yield config_path, servers
        nursery.cancel_scope.cancel()


async def run_against(config_path: Path, *arguments: str) -> CommandResult:
    return await run_command([*CLIENT_COMMAND, "-c", str(config_path), *arguments])


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (edited_transaction, "block 2: transactions do not match the transactions root"),
        (wrong_state_digest, "block 2: state digest differs from re-execution"),
        (wrong_result, "block 2: stored results differ from re-execution"),
        (broken_parent_link, "block 3: parent hash does not match block 2"),
        (certificate_short_of_a_quorum, f"block 2: {FAKE_NETWORK.quorum - 1} valid commit signatures, {FAKE_NETWORK.quorum} needed"),
        (truncated, "chain ends at block 2, but f+1 replicas vouch for height 4"),
    ],
    ids=["edited_transaction", "wrong_state_digest", "wrong_result", "broken_parent_link", "short_certificate", "truncated"],
)
async def test_verify_names_what_failed_at_which_height(
    tmp_path: Path, tamper: Callable[[list[Block]], list[Block]], expected: str
) -> None:
    """Regression for `truncated`: a replica serving only the start of its chain passed verify."""
    async with fake_network(tmp_path, tamper(HONEST_CHAIN)) as (config_path, _):
        result = await run_against(config_path, "--json", "verify", "--replica", str(SERVING_REPLICA))
        line = one_line_error(result, "ledger-client", EXIT_INVALID_CHAIN)
        assert line.startswith(f"ledger-client: verification FAILED: replica {SERVING_REPLICA}'s chain: {expected}"), line
        # In text mode the progress lines come first; the failure is still the last line alone.
        text = await run_against(config_path, "verify", "--replica", str(SERVING_REPLICA))
        assert text.exit_code == EXIT_INVALID_CHAIN and text.stderr.splitlines()[-1] == line, text.describe()
        assert all(line.startswith("  verified through block ") for line in text.stderr.splitlines()[:-1]), text.describe()


async def test_every_documented_exit_code(tmp_path: Path) -> None:
    """0 ok, 1 failed or refused, 2 bad arguments or config, 3 network unavailable, 4 chain verification failed."""
    async with fake_network(tmp_path, HONEST_CHAIN) as (config_path, servers):
        verified = await run_against(config_path, "--json", "verify", "--replica", str(SERVING_REPLICA))
        assert verified.exit_code == 0 and verified.json()["height"] == len(HONEST_CHAIN), verified.describe()
        missing = await run_against(config_path, "block", "99")
        assert one_line_error(missing, "ledger-client", EXIT_FAILED) == "ledger-client: no block 99 (height 4)"
        usage = await run_against(config_path, "verify", "--replica", "9")
        assert "--replica: expected 0..3" in one_line_error(usage, "ledger-client", EXIT_USAGE)
        missing_config = await run_against(tmp_path / "nowhere.toml", "status")
        assert "nowhere.toml" in one_line_error(missing_config, "ledger-client", EXIT_USAGE)
        servers.cancel()  # every replica stopped
        stopped = await run_against(config_path, "--timeout", "1", "block", "1")
        assert "network unavailable" in one_line_error(stopped, "ledger-client", EXIT_UNAVAILABLE)
        status = await run_against(config_path, "status")
        assert status.exit_code == EXIT_UNAVAILABLE and "unreachable" in status.stdout, status.describe()
    async with fake_network(tmp_path, truncated(HONEST_CHAIN)) as (config_path, _):
        invalid = await run_against(config_path, "verify", "--replica", str(SERVING_REPLICA))
        assert invalid.exit_code == EXIT_INVALID_CHAIN, invalid.describe()


# ---- --version and python -m ----


@pytest.mark.parametrize(("program", "module"), [("ledger-node", "node.cli"), ("ledger-client", "client.cli")])
async def test_version_and_help_from_the_script_and_from_python_m(program: str, module: str) -> None:
    """Regression: neither program had --version."""
    expected = f"{program} {importlib.metadata.version('pbft-ledger')}"
    script = Path(sys.executable).with_name(program)
    for command in ([str(script)], [sys.executable, "-m", module]):
        version = await run_command([*command, "--version"])
        assert (version.exit_code, version.stdout.strip(), version.stderr) == (0, expected, ""), version.describe()
        shown = await run_command([*command, "--help"])
        assert shown.exit_code == 0 and shown.stdout.startswith(f"usage: {program} "), shown.describe()
        assert "--version" in shown.stdout and shown.stderr == "", shown.describe()
