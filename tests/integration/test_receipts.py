"""Offline receipts through the real command line: `tx ID --save FILE` on a live network, then
`check-receipt FILE` once the network is gone, and every kind of tampered or foreign receipt refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from client.library import Client
from client.quorum import Receipt
from ledger.receipts import TransactionReceipt, read_receipt_file, receipt_size_max
from ledger.transactions import Put

from .local_network import (
    CLIENT_COMMAND,
    LocalNetwork,
    generate_network,
    run_client_cli,
    run_command,
)
from .test_cli import EXIT_INVALID_CHAIN, EXIT_USAGE, one_line_error

pytestmark = pytest.mark.integration

ROUNDS_MAX = 5  # rounds of concurrent puts to get a block holding more than one transaction
PUTS_PER_ROUND = 8


async def put_until_a_block_holds_several(client: Client) -> str:
    """The id of a transaction sharing its block with others, so its Merkle path is not empty."""
    # One put first: the client then knows its next nonce and gives the concurrent puts consecutive ones.
    await client.put("receipt-first", "value")
    for round_number in range(ROUNDS_MAX):
        receipts: list[Receipt] = []

        async def put(key: str, receipts: list[Receipt] = receipts) -> None:
            receipts.append(await client.put(key, "value"))

        async with trio.open_nursery() as nursery:
            for number in range(PUTS_PER_ROUND):
                nursery.start_soon(put, f"receipt-{round_number}-{number}")
        heights = [receipt.height for receipt in receipts]
        for receipt in receipts:
            if heights.count(receipt.height) > 1 and receipt.index > 0:
                return receipt.transaction_id.hex()
    raise AssertionError(f"no block held two of {ROUNDS_MAX * PUTS_PER_ROUND} concurrent puts")


def flipped(data: bytes, part: bytes, offset: int = -1) -> bytes:
    """`data` with one byte of (the only occurrence of) `part` changed."""
    assert data.count(part) == 1, part
    position = data.index(part) + (offset % len(part))
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


async def check(network: LocalNetwork, path: Path, config: Path | None = None) -> object:
    return await run_command([*CLIENT_COMMAND, "-c", str(config or network.client_config_path), "check-receipt", str(path)])


@pytest.mark.parametrize("replica_count", [4])
async def test_a_receipt_saved_from_a_live_network_verifies_after_it_stopped_and_no_tampered_one_does(
    network: LocalNetwork, client: Client, tmp_path: Path
) -> None:
    transaction_id = await put_until_a_block_holds_several(client)
    path = tmp_path / "put.receipt"
    saved = await run_client_cli(network, "--json", "tx", transaction_id[:12], "--save", str(path))
    assert saved.exit_code == 0, saved.describe()
    assert saved.json()["receipt_file"] == str(path)
    original = path.read_bytes()
    assert not list(tmp_path.glob(".receipt-*.tmp"))  # no temporary file left behind

    refused = await run_client_cli(network, "tx", transaction_id, "--save", str(path))
    assert "already exists (use --force" in one_line_error(refused, "ledger-client", EXIT_USAGE)
    assert path.read_bytes() == original
    forced = await run_client_cli(network, "tx", transaction_id, "--save", str(path), "--force")
    assert forced.exit_code == 0, forced.describe()

    await network.stop()

    checked = await check(network, path)
    assert checked.exit_code == 0, checked.describe()
    assert f"receipt verified offline: transaction {transaction_id}" in checked.stdout, checked.describe()
    as_json = await run_command([*CLIENT_COMMAND, "-c", str(network.client_config_path), "--json", "check-receipt", str(path)])
    assert as_json.json()["valid"] and as_json.json()["transaction_id"] == transaction_id

    data = path.read_bytes()
    receipt = read_receipt_file(path)
    assert receipt.transaction_path, "the transaction shares its block, so its path is not empty"
    assert isinstance(receipt.transaction.operation, Put)
    tampered = {
        "transaction": flipped(data, receipt.transaction.operation.value.encode()),
        "transaction path": flipped(data, receipt.transaction_path[0]),
        "header state digest": flipped(data, receipt.header.state_digest),
        "header transactions root": flipped(data, receipt.header.transactions_root),
        "commit signature": flipped(data, receipt.certificate.signatures[0][1], 5),
        "block-hash signature": flipped(data, receipt.block_hash_signatures[0].signature, 7),
    }
    for name, changed in tampered.items():
        changed_path = tmp_path / f"{name.replace(' ', '-')}.receipt"
        changed_path.write_bytes(changed)
        result = await check(network, changed_path)
        line = one_line_error(result, "ledger-client", EXIT_INVALID_CHAIN)
        assert "receipt verification FAILED" in line, (name, line)

    other = generate_network(tmp_path / "other", 4)  # also "local-4", with its own keys
    foreign = await check(network, path, other.directory / "client.toml")
    assert "genesis hash differs" in one_line_error(foreign, "ledger-client", EXIT_INVALID_CHAIN)

    malformed = {
        "truncated": (data[: len(data) // 2], "not a valid receipt"),
        "garbage": (b"\x00not a receipt at all\xff" * 10, "not a valid receipt"),
        "oversized": (data + bytes(receipt_size_max()), "larger than any valid receipt"),
        "empty": (b"", "not a valid receipt"),
    }
    for name, (content, expected) in malformed.items():
        bad_path = tmp_path / f"{name}.receipt"
        bad_path.write_bytes(content)
        line = one_line_error(await check(network, bad_path), "ledger-client", EXIT_INVALID_CHAIN)
        assert expected in line, (name, line)
    missing = await check(network, tmp_path / "no-such.receipt")
    assert "cannot read" in one_line_error(missing, "ledger-client", EXIT_USAGE)
    assert TransactionReceipt.decode(data) == receipt
