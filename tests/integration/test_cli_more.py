"""More of `ledger-client` and `ledger-node` through their real command lines: transaction id
prefixes, duplicate replica identities, every documented exit code, what `verify` names when a
replica serves a bad chain, and --version."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.crypto import SigningKey, write_key_file
from ledger.transactions import Put, sign_transaction

from .local_network import LocalNetwork, run_client_cli
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
