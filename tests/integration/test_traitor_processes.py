"""Traitor replicas as real processes (`ledger-node run --traitor SPEC`): the honest ones still commit
every client's transactions, agree on one chain that verifies, and no client accepts a lie."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from client.library import Client
from client.quorum import Receipt
from ledger.config import Address
from ledger.crypto import signing_domain, verify_signature
from ledger.framing import FramedStream
from ledger.messages import BATCH_REPLY_DOMAIN, Reply, Request, decode_message, encode_message
from ledger.transactions import Put, Transaction

from .local_network import CLIENT_COMMAND, fetch_chain, run_command
from .replica_processes import Load, ReplicaProcesses, connected_client, replica_processes

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0
REPLICA_COUNT = 4


async def honest_chains_agree(client: Client, honest: list[int], receipts: list[Receipt]) -> int:
    """The honest replicas reach one tip holding every receipt, serve the same chain, and each
    chain verifies from genesis (certificates, links, re-execution). Returns its height."""
    minimum_height = max(receipt.height for receipt in receipts)
    while True:
        statuses = [status for status in await client.status(wait_s=1.0) if status.replica_id in honest]
        tips = {(status.height, status.last_block_hash) for status in statuses}
        if all(status.reachable for status in statuses) and len(tips) == 1 and statuses[0].height >= minimum_height:
            break
        await trio.sleep(0.2)
    chains = [await fetch_chain(client, replica_id) for replica_id in honest]
    assert len({tuple(block.block_hash for block in chain) for chain in chains}) == 1, "honest replicas serve different chains"
    for replica_id in honest:
        report = await client.verify_chain(replica_id)
        assert report.height >= minimum_height
    chain = chains[0]
    for receipt in receipts:
        block = chain[receipt.height - 1]
        assert block.block_hash == receipt.block_hash
        assert block.transactions[receipt.index].transaction_id == receipt.transaction_id
        assert block.results[receipt.index] == receipt.result
    return len(chain)


async def reply_from(address: Address, transaction: Transaction) -> Reply:
    """Ask one replica directly, as a retransmitting client would, for a transaction's REPLY."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        framed = FramedStream(stream, 1 << 20)
        await framed.send(encode_message(Request(transaction)))
        while True:
            data = await framed.receive()
            assert data is not None, "the replica closed the connection"
            message = decode_message(data)
            if isinstance(message, Reply) and message.transaction_id == transaction.transaction_id:
                return message


def traitor_announced(replicas: ReplicaProcesses, replica_id: int) -> bool:
    return "is a TRAITOR" in replicas.log_path(replica_id).read_text(errors="replace")


async def test_an_equivocating_primary_is_replaced_and_the_honest_chains_agree(tmp_path: Path) -> None:
    arguments = {0: ["--traitor", "equivocating_primary"]}
    async with replica_processes(tmp_path / "net", REPLICA_COUNT, extra_arguments=arguments) as replicas:
        async with connected_client(replicas) as client:
            with trio.fail_after(DEADLINE_S):
                load = Load(client, writers=4)
                await load.run(40)
                assert len(load.receipts) == 40
                # Replica 0 sent backups two batches for each slot: nothing commits until it is replaced.
                assert all(receipt.view >= 1 for receipt in load.receipts)
                await honest_chains_agree(client, [1, 2, 3], load.receipts)
                statuses = await client.status()
                assert all(status.view >= 1 for status in statuses if status.replica_id != 0 and status.reachable)
        assert traitor_announced(replicas, 0)


async def test_a_client_never_accepts_the_wrong_replies_of_a_traitor(tmp_path: Path) -> None:
    arguments = {1: ["--traitor", "wrong_replies", "--traitor-seed", "5"]}
    async with replica_processes(tmp_path / "net", REPLICA_COUNT, extra_arguments=arguments) as replicas:
        async with connected_client(replicas) as client:
            with trio.fail_after(DEADLINE_S):
                receipts = []
                transactions = []
                for index in range(6):
                    transaction = await client.sign(Put(f"key-{index}", f"value {index}"))
                    receipt = await client.submit(transaction)
                    assert receipt.result.ok and 1 not in receipt.replicas
                    transactions.append(transaction)
                    receipts.append(receipt)
                await honest_chains_agree(client, [0, 2, 3], receipts)
                # The traitor does lie, with its real key: asked directly, it signs another outcome.
                network = replicas.network
                domain = signing_domain(network.identity, BATCH_REPLY_DOMAIN)
                for transaction, receipt in zip(transactions, receipts, strict=True):
                    lie = await reply_from(network.replicas[1].client_address, transaction)
                    assert lie.replica_id == 1
                    assert verify_signature(network.replicas[1].public_key, domain, lie.batch.signed_bytes(), lie.batch.signature)
                    assert lie.matching_key() != (receipt.transaction_id, receipt.result, receipt.height, receipt.block_hash, receipt.index)
                    honest = await reply_from(network.replicas[2].client_address, transaction)
                    assert honest.matching_key() == (receipt.transaction_id, receipt.result, receipt.height, receipt.block_hash, receipt.index)
        assert traitor_announced(replicas, 1)


async def test_a_replica_sending_malformed_frames_and_bad_signatures_harms_no_one(tmp_path: Path) -> None:
    arguments = {2: ["--traitor", "malformed_sender:rate=1.0,burst=4"]}
    async with replica_processes(tmp_path / "net", REPLICA_COUNT, extra_arguments=arguments) as replicas:
        async with connected_client(replicas) as client:
            with trio.fail_after(DEADLINE_S):
                load = Load(client, writers=4)
                await load.run(40)
                assert len(load.receipts) == 40
                await honest_chains_agree(client, [0, 1, 3], load.receipts)
        honest_logs = "".join(replicas.log_path(replica_id).read_text(errors="replace") for replica_id in (0, 1, 3))
        assert "malformed message from replica 2" in honest_logs  # its raw frames arrived, and were dropped
        assert traitor_announced(replicas, 2)


async def test_an_equivocating_primarys_two_pre_prepares_are_kept_as_evidence_and_listed_by_the_cli(tmp_path: Path) -> None:
    """Replica 0 sends each backup one of two pre-prepares per slot; the VIEW-CHANGEs that carry the
    other one show it to the backup that held the first: that backup keeps both as evidence, and
    `ledger-client evidence` (the real CLI) names replica 0 and the slot, both signatures checked."""
    arguments = {0: ["--traitor", "equivocating_primary"]}
    async with replica_processes(tmp_path / "net", REPLICA_COUNT, extra_arguments=arguments) as replicas:
        async with connected_client(replicas) as client:
            with trio.fail_after(DEADLINE_S):
                load = Load(client, writers=2)
                await load.run(6)
                while True:
                    reports, _ = await client.evidence(wait_s=1.0)
                    if reports:
                        break
                    await trio.sleep(0.2)
                assert all(report.evidence.replica_id == 0 and report.proven for report in reports)
                slots = {(report.evidence.kind, report.evidence.view, report.evidence.sequence) for report in reports}
            listed = await run_command(
                [*CLIENT_COMMAND, "-c", str(replicas.client_config_path), "--json", "evidence", "--replica", "0"],
                cwd=replicas.directory,
            )
            assert listed.exit_code == 0, listed.describe()
            entries = json.loads(listed.stdout)["evidence"]
            assert {(entry["kind"], entry["view"], entry["sequence"]) for entry in entries} >= slots
            assert all(entry["replica"] == 0 and entry["signatures_valid"] == [True, True] for entry in entries)
            assert all(entry["digests"][0] != entry["digests"][1] for entry in entries)
            text = await run_command([*CLIENT_COMMAND, "-c", str(replicas.client_config_path), "evidence"], cwd=replicas.directory)
            assert text.exit_code == 0 and "replica 0 signed two pre-prepare messages" in text.stdout, text.describe()
            assert "both signatures verify" in text.stdout
            status = await run_command(
                [*CLIENT_COMMAND, "-c", str(replicas.client_config_path), "--json", "status"], cwd=replicas.directory
            )
            counts = {entry["replica"]: entry["evidence"] for entry in json.loads(status.stdout)["replicas"]}
            assert sum(counts.values()) > 0 and counts[0] == 0, status.describe()
        honest_logs = "".join(replicas.log_path(replica_id).read_text(errors="replace") for replica_id in (1, 2, 3))
        assert "EVIDENCE: replica 0 signed two pre-prepare messages" in honest_logs
