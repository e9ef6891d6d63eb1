"""More of `ledger-client` and `ledger-node` through their real command lines: transaction id
prefixes, duplicate replica identities, every documented exit code, what `verify` names when a
replica serves a bad chain, and --version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from ledger.crypto import SigningKey, write_key_file
from ledger.transactions import Put, sign_transaction

from .local_network import NODE_COMMAND, LocalNetwork, run_client_cli
from .test_cli import EXIT_FAILED, EXIT_USAGE, one_line_error

pytestmark = pytest.mark.integration

# Two puts of this key whose transaction ids share their first 8 hex digits in network "local-4"
# (found once by signing ~50000 values; Ed25519 signatures are deterministic, so they always do).
COLLIDING_SEED = bytes(range(32))
COLLIDING_PUTS = ((0, Put("k", "a48402")), (1, Put("k", "b347")))


@pytest.mark.parametrize("replica_count", [4])
async def test_tx_accepts_a_unique_prefix_and_names_an_unknown_or_ambiguous_one(network: LocalNetwork, tmp_path: Path) -> None:
    """Regression: `tx` took only all 64 hex digits of an id."""
    key = SigningKey.from_private_bytes(COLLIDING_SEED)
    key_path = tmp_path / "colliding.key"
    write_key_file(key_path, key)
    transactions = [sign_transaction(network.network.network_id, key, nonce, put) for nonce, put in COLLIDING_PUTS]
    shared = transactions[0].transaction_id.hex()[:8]
    assert transactions[1].transaction_id.hex()[:8] == shared
    for _, put in COLLIDING_PUTS:
        result = await run_client_cli(network, "--key", str(key_path), "put", put.key, put.value)
        assert result.exit_code == 0, result.describe()

    unique = transactions[1].transaction_id.hex()
    for prefix in (unique[:9], unique[:12].upper(), unique[:63]):
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
        assert "warning: replica 3's key is in use by more than one process (replica 0 has 2" in shown.stdout, shown.describe()
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
