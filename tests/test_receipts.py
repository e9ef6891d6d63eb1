"""Offline transaction receipts (ledger/receipts.py): what they prove, and that nothing else passes."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from chain_helpers import (
    LedgerNetwork,
    build_block,
    build_chain,
    deterministic_key,
    make_network,
    make_transactions,
    sign_certificate,
)
from test_sizes import HASH, LAST_REPLICA, SIGNATURE, largest_result, largest_transaction

from client.cli import EXIT_INVALID_CHAIN, EXIT_USAGE, main
from client.library import Client, ClientError
from ledger.application import AccountsApplication, is_deferred, is_outcome
from ledger.blocks import REPLICAS_MAX, Block, BlockHeader, CommitCertificate, results_root
from ledger.config import ClientConfig
from ledger.crypto import signing_domain
from ledger.encoding import INTEGER_MAX, encode
from ledger.merkle import merkle_proof, merkle_root
from ledger.messages import QUERY_NONCE_SIZE, Query, QueryReply
from ledger.receipts import (
    MERKLE_PATH_LENGTH_MAX,
    BlockHashSignature,
    ReceiptError,
    TransactionReceipt,
    build_receipt,
    read_receipt_file,
    receipt_size_max,
    result_leaf,
    verify_receipt,
    write_receipt_file,
)
from ledger.transactions import Put, Transaction, TransactionResult, Transfer, sign_transaction
from node.simulator import Scenario, Simulation

NONCE = b"\x07" * QUERY_NONCE_SIZE


def block_hash_replies(network: LedgerNetwork, block: Block, signers: list[int], query: Query) -> list[QueryReply]:
    domain = signing_domain(network.identity, "query-reply")
    replies = []
    for replica_id in signers:
        unsigned = QueryReply(query.query_id, query.digest, replica_id, block.height + 1, block.block_hash, "")
        signature = network.replica_signing_keys[replica_id].sign(domain, unsigned.signed_bytes())
        replies.append(replace(unsigned, signature=signature))
    return replies


def make_receipt(network: LedgerNetwork, signers: list[int] | None = None, index: int = 1) -> tuple[TransactionReceipt, Block]:
    block = build_chain(network, 2, transactions_per_block=5)[1]
    query = Query(9, "block-hash", block.height, 1, NONCE)
    chosen = list(range(network.faults_tolerated + 1)) if signers is None else signers
    return build_receipt(network.config, block, index, query, block_hash_replies(network, block, chosen, query)), block


def failure(receipt: TransactionReceipt, network: LedgerNetwork) -> str:
    with pytest.raises(ReceiptError) as caught:
        verify_receipt(receipt, network.config)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("replica_count", [4, 7])
@pytest.mark.parametrize("index", [0, 3, 4])
def test_a_receipt_verifies_offline_after_a_round_trip_through_its_file_bytes(replica_count: int, index: int) -> None:
    network = make_network(replica_count=replica_count)
    receipt, block = make_receipt(network, index=index)
    decoded = TransactionReceipt.decode(receipt.encode())
    assert decoded == receipt
    checked = verify_receipt(decoded, network.config)
    assert checked.receipt.transaction == block.transactions[index]
    assert checked.certificate_signers == tuple(range(network.quorum))
    assert checked.block_hash_signers == tuple(range(network.faults_tolerated + 1))


def test_every_single_byte_change_of_a_receipt_file_is_refused() -> None:
    """Whatever byte an attacker changes (transaction, paths, header, certificate, signatures,
    the query, the names), the file either does not decode or does not verify: ReceiptError, never
    another exception, never a pass."""
    network = make_network()
    data = make_receipt(network)[0].encode()
    for position in range(len(data)):
        for flip in (0x01, 0x80):
            changed = bytearray(data)
            changed[position] ^= flip
            with pytest.raises(ReceiptError):
                verify_receipt(TransactionReceipt.decode(bytes(changed)), network.config)


def test_a_different_result_is_refused_although_the_commit_certificate_still_verifies() -> None:
    """The commit certificate signs only the batch (not the results root): a receipt forged with
    another result and a header rebuilt around it keeps a valid certificate. The f+1 signed block
    hashes are what refuse it."""
    network = make_network()
    receipt, block = make_receipt(network)
    lie = TransactionResult(False, "insufficient funds")
    results = list(block.results)
    results[receipt.index] = lie
    header = replace(receipt.header, results_root=results_root(results))
    forged = build_receipt(network.config, Block(header, block.transactions, tuple(results), block.certificate), receipt.index, receipt.query(), [])
    forged = replace(forged, block_hash_signatures=receipt.block_hash_signatures)
    assert header.batch_digest() == block.header.batch_digest()  # the certificate still fits
    assert "valid replica signatures, f+1 = 2 needed" in failure(forged, network)


def test_f_block_hash_signatures_or_one_replica_twice_are_not_enough() -> None:
    network = make_network(replica_count=7)
    receipt, _ = make_receipt(network, signers=[0, 1])
    assert "2 valid replica signatures, f+1 = 3 needed" in failure(receipt, network)
    doubled = replace(receipt, block_hash_signatures=receipt.block_hash_signatures + (receipt.block_hash_signatures[0],) * 3)
    assert "2 valid replica signatures" in failure(doubled, network)
    unknown = replace(receipt, block_hash_signatures=receipt.block_hash_signatures + (BlockHashSignature(40, 3, SIGNATURE),))
    assert "2 valid replica signatures" in failure(unknown, network)


def test_a_certificate_short_of_a_quorum_or_with_a_replica_twice_is_refused() -> None:
    network = make_network()
    receipt, _ = make_receipt(network)
    short = replace(receipt, certificate=sign_certificate(network, receipt.header, signers=[0, 1]))
    assert "commit certificate" in failure(short, network) and "2 valid commit signatures, 3 needed" in failure(short, network)
    doubled = replace(receipt, certificate=sign_certificate(network, receipt.header, signers=[0, 1, 1, 1]))
    assert "2 valid commit signatures, 3 needed" in failure(doubled, network)


def test_a_receipt_of_another_network_is_refused_by_id_and_by_genesis() -> None:
    network = make_network("net-a")
    receipt, _ = make_receipt(network)
    assert "for network 'net-a', this config is for network 'net-b'" in failure(receipt, make_network("net-b"))
    # Same id, other replica keys: the genesis hash tells them apart.
    impostor = LedgerNetwork("net-a", make_network("elsewhere").replica_signing_keys, network.client_key)
    assert "genesis hash differs" in failure(receipt, impostor)


def test_a_transaction_whose_sender_did_not_sign_it_is_refused() -> None:
    network = make_network()
    receipt, _ = make_receipt(network)
    other = receipt.transaction
    unsigned = Transaction(other.sender, other.nonce, Put("k", "v"), other.signature)
    assert "sender's signature does not verify" in failure(replace(receipt, transaction=unsigned), network)


def test_a_claimed_position_other_than_the_real_one_is_refused() -> None:
    network = make_network()
    receipt, _ = make_receipt(network, index=4)
    assert "Merkle path does not lead" in failure(replace(receipt, index=3), network)
    assert "Merkle path does not lead" in failure(replace(receipt, leaf_count=4, index=3), network)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not a valid receipt"),
        (b"\xff\x00garbage", "not a valid receipt"),
        (encode([1, 2, 3]), "expected a CBOR map"),
        (encode({"format": "something-else"}), "not a transaction receipt"),
        (encode({"format": "pbft-ledger/transaction-receipt", "version": 2}), "version 2 is not supported"),
        (bytes(receipt_size_max() + 1), "larger than any valid receipt"),
    ],
)
def test_malformed_files_give_one_line(data: bytes, expected: str) -> None:
    with pytest.raises(ReceiptError) as caught:
        TransactionReceipt.decode(data)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_receipts_and_added_fields_are_refused() -> None:
    network = make_network()
    receipt, _ = make_receipt(network)
    data = receipt.encode()
    for length in range(len(data)):
        with pytest.raises(ReceiptError):
            TransactionReceipt.decode(data[:length])
    with pytest.raises(ReceiptError, match="unknown"):
        TransactionReceipt.decode(encode({**receipt.to_plain(), "comment": "trust me"}))


def test_a_non_canonical_encoding_of_a_valid_receipt_is_refused() -> None:
    network = make_network()
    data = make_receipt(network)[0].encode()
    # The version, 1, re-encoded in two bytes: the same value, other bytes.
    position = data.index(encode("version")) + len(encode("version"))
    assert data[position] == 0x01
    longer = data[:position] + b"\x18\x01" + data[position + 1 :]
    with pytest.raises(ReceiptError, match="canonical"):
        TransactionReceipt.decode(longer)


def test_the_largest_receipt_fits_the_bound() -> None:
    header = BlockHeader(INTEGER_MAX, INTEGER_MAX, LAST_REPLICA, HASH, HASH, HASH, HASH, INTEGER_MAX)
    receipt = TransactionReceipt(
        network_id="n" * 64,
        genesis_hash=HASH,
        transaction=largest_transaction(),
        result=largest_result(),
        index=9_999,
        leaf_count=10_000,
        transaction_path=(HASH,) * MERKLE_PATH_LENGTH_MAX,
        result_path=(HASH,) * MERKLE_PATH_LENGTH_MAX,
        header=header,
        certificate=CommitCertificate(INTEGER_MAX, tuple((LAST_REPLICA, SIGNATURE) for _ in range(REPLICAS_MAX))),
        query_id=INTEGER_MAX,
        query_min_height=INTEGER_MAX,
        query_nonce=NONCE,
        block_hash_signatures=tuple(BlockHashSignature(LAST_REPLICA, INTEGER_MAX, SIGNATURE) for _ in range(REPLICAS_MAX)),
    )
    data = receipt.encode()
    assert len(data) <= receipt_size_max()
    assert TransactionReceipt.decode(data) == receipt



def test_writing_never_replaces_a_file_without_force_and_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = make_network()
    receipt, _ = make_receipt(network)
    path = tmp_path / "r.receipt"
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_receipt_file(path, receipt)
    assert path.read_bytes() == b"someone else's"
    write_receipt_file(path, receipt, force=True)
    assert read_receipt_file(path) == receipt

    fresh = tmp_path / "fresh.receipt"

    def crash(descriptor: int) -> None:
        raise OSError(5, "disk on fire")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk on fire"):
        write_receipt_file(fresh, receipt)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["r.receipt"]


def test_reading_refuses_a_fifo_and_an_oversized_file_without_reading_it_all(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ReceiptError, match="not a regular file"):
        read_receipt_file(fifo)
    large = tmp_path / "large"
    large.write_bytes(bytes(10 * receipt_size_max()))
    with pytest.raises(ReceiptError, match="larger than any valid receipt"):
        read_receipt_file(large)


@pytest.mark.parametrize(
    ("plain", "expected"),
    [
        ({"format": "pbft-ledger/transaction-receipt", "version": "1\nFAKE: verified"}, "version '1\\nFAKE"),
        ({"format": "pbft-ledger/transaction-receipt", "version": 1, **{f"x\n{number}": 0 for number in range(50)}}, "and 46 more"),
    ],
)
def test_what_a_hostile_file_holds_cannot_break_the_one_line_message(plain: dict[str, object], expected: str) -> None:
    with pytest.raises(ReceiptError) as caught:
        TransactionReceipt.decode(encode(plain))
    assert expected in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 1000


def write_client_config(path: Path, network: LedgerNetwork) -> Path:
    """A client.toml describing `network`, for running `ledger-client check-receipt` (offline)."""
    lines = ["[network]", f'id = "{network.network_id}"', ""]
    for replica in network.config.replicas:
        lines += [
            "[[replicas]]",
            f"id = {replica.replica_id}",
            f'public_key = "{replica.public_key.hex()}"',
            f'address = "127.0.0.1:{17100 + 2 * replica.replica_id}"',
            f'client_address = "127.0.0.1:{17101 + 2 * replica.replica_id}"',
            "",
        ]
    for account, balance in sorted(network.balances.items()):
        lines += ["[[genesis.accounts]]", f'public_key = "{account.hex()}"', f"balance = {balance}", ""]
    path.write_text("\n".join(lines))
    return path


def non_final_chain(network: LedgerNetwork) -> list[Block]:
    """An honest chain (really executed, every replica signing) holding both kinds of entry that
    are not a transaction's outcome: block 1 orders nonce 1 before nonce 0 (deferred), block 2
    executes both, block 3 orders nonce 0 again (replayed)."""
    merchant = deterministic_key("merchant").public_key
    first = sign_transaction(network.identity, network.client_key, 0, Transfer(merchant, 100))
    second = sign_transaction(network.identity, network.client_key, 1, Transfer(merchant, 250))
    application = AccountsApplication(network.balances)
    blocks: list[Block] = []
    parent = network.genesis
    for height, transactions in [(1, [second]), (2, [first, second]), (3, [first])]:
        results = tuple(application.execute_block(transactions))
        header = BlockHeader(
            height, 0, 0, parent, merkle_root([item.transaction_id for item in transactions]), results_root(results),
            application.state_digest(), 1_700_000_000_000 + height,
        )
        blocks.append(Block(header, tuple(transactions), results, sign_certificate(network, header, signers=range(network.replica_count))))
        parent = header.block_hash
    return blocks


def assemble_receipt(network: LedgerNetwork, block: Block, index: int) -> TransactionReceipt:
    """A receipt put together field by field, as anyone holding the public block and two honest
    replicas' signed block-hash answers can (without build_receipt's own checks)."""
    query = Query(1, "block-hash", block.height, 0, NONCE)
    replies = block_hash_replies(network, block, [1, 2], query)
    return TransactionReceipt(
        network_id=network.network_id,
        genesis_hash=network.genesis,
        transaction=block.transactions[index],
        result=block.results[index],
        index=index,
        leaf_count=len(block.transactions),
        transaction_path=tuple(merkle_proof(block.transaction_ids(), index)),
        result_path=tuple(merkle_proof([result_leaf(result) for result in block.results], index)),
        header=block.header,
        certificate=block.certificate,
        query_id=query.query_id,
        query_min_height=query.min_height,
        query_nonce=query.nonce,
        block_hash_signatures=tuple(BlockHashSignature(reply.replica_id, reply.height, reply.signature) for reply in replies),
    )


@pytest.mark.parametrize(("kind", "height"), [("deferred", 1), ("replayed", 3)])
def test_a_receipt_for_a_deferred_or_replayed_entry_is_refused(kind: str, height: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Honest blocks hold entries that are not the transaction's outcome: a receipt for one would
    be a verified "failed" for a payment that executed (in block 2). The library, build_receipt
    and check-receipt (text and --json) refuse it; the executed entry's receipt verifies."""
    network = make_network("prod-net")
    blocks = non_final_chain(network)
    block = blocks[height - 1]
    assert block.results[0].reason.startswith(f"{kind}:")
    receipt = assemble_receipt(network, block, 0)
    message = failure(receipt, network)
    assert "not the transaction's outcome" in message and "must come from the block where it executed" in message
    with pytest.raises(ReceiptError, match="not the transaction's outcome"):
        build_receipt(network.config, block, 0, receipt.query(), [])
    path = write_client_config(tmp_path / "client.toml", network)
    (tmp_path / "non-final.receipt").write_bytes(receipt.encode())
    for extra in ([], ["--json"]):
        assert main(["-c", str(path), *extra, "check-receipt", str(tmp_path / "non-final.receipt")]) == EXIT_INVALID_CHAIN
        captured = capsys.readouterr()
        assert captured.out == "" and "not the transaction's outcome" in captured.err and captured.err.count("\n") == 1
    where_executed = blocks[1].transactions.index(block.transactions[0])
    executed = verify_receipt(assemble_receipt(network, blocks[1], where_executed), network.config)
    assert executed.receipt.result.ok and executed.receipt.transaction == block.transactions[0]


@pytest.mark.parametrize("height", [1, 3])
def test_the_library_builds_no_receipt_for_an_entry_that_is_not_the_outcome(height: int) -> None:
    """Client.transaction_receipt refuses before asking the network for signatures."""
    network = make_network("prod-net")
    block = non_final_chain(network)[height - 1]
    client = Client(ClientConfig(network.config, Path("client.key"), Path("client.toml")), None)
    with pytest.raises(ClientError, match="not the transaction's outcome"):
        trio.run(client.transaction_receipt, block, 0)


def test_a_receipt_of_a_network_with_the_same_id_and_keys_but_other_balances_is_refused() -> None:
    """The reviewer's genesis_replay.py: network B (a staging copy, or the network re-created with
    new genesis balances and the old replica keys) must not accept network A's receipt, even with
    its genesis-hash field rewritten to B's: every signature is bound to the genesis hash."""
    network_a = make_network("prod-net")
    network_b = LedgerNetwork("prod-net", network_a.replica_signing_keys, network_a.client_key, client_balance=5)
    assert network_a.genesis != network_b.genesis
    receipt, _ = make_receipt(network_a)
    assert "genesis hash differs" in failure(receipt, network_b)
    forged = replace(receipt, genesis_hash=network_b.genesis)
    assert "signature does not verify" in failure(forged, network_b)
    verify_receipt(receipt, network_a.config)


def test_a_block_1_receipt_whose_parent_is_not_the_genesis_is_refused() -> None:
    """Block 1's parent hash is the genesis hash, which a receipt of block 1 can check offline."""
    network = make_network()
    block = build_block(network, b"\x01" * 32, 1, make_transactions(network, 0, 3))
    query = Query(9, "block-hash", 1, 1, NONCE)
    receipt = build_receipt(network.config, block, 0, query, block_hash_replies(network, block, [0, 1], query))
    assert "block 1's parent hash is not the genesis hash" in failure(receipt, network)
    honest = build_block(network, network.genesis, 1, make_transactions(network, 0, 3))
    query = Query(9, "block-hash", 1, 1, NONCE)
    verify_receipt(build_receipt(network.config, honest, 0, query, block_hash_replies(network, honest, [0, 1], query)), network.config)


def test_a_receipt_file_is_written_with_the_umask_applied_like_any_file(tmp_path: Path) -> None:
    """A receipt is public: mode 0666 minus the umask (0644 under the usual 022), not mkstemp's 0600."""
    receipt, _ = make_receipt(make_network())
    previous = os.umask(0o022)
    try:
        write_receipt_file(tmp_path / "public.receipt", receipt)
        os.umask(0o077)
        write_receipt_file(tmp_path / "private.receipt", receipt)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "public.receipt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.receipt").stat().st_mode) == 0o600


def test_the_longest_valid_file_name_is_not_refused_because_of_the_temporary_name(tmp_path: Path) -> None:
    receipt, _ = make_receipt(make_network())
    longest = tmp_path / ("r" * os.pathconf(tmp_path, "PC_NAME_MAX"))
    write_receipt_file(longest, receipt)
    assert read_receipt_file(longest) == receipt
    assert sorted(item.name for item in tmp_path.iterdir()) == [longest.name]  # no temporary file left


def test_a_file_name_with_a_newline_cannot_break_the_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Error lines show a file name escaped (as repr does), so no name can add a line of its own
    (e.g. a fake 'receipt verified offline') or fail to print (undecodable bytes)."""
    network = make_network()
    config = write_client_config(tmp_path / "client.toml", network)
    fifo = tmp_path / "a\nreceipt verified offline: fifo"
    os.mkfifo(fifo)
    garbage = tmp_path / "b\nreceipt verified offline: garbage"
    garbage.write_bytes(b"garbage")
    undecodable = Path(os.fsdecode(bytes(tmp_path) + b"/c\xff\n.receipt"))
    undecodable.write_bytes(b"garbage")
    for path in (fifo, garbage, tmp_path / "missing\nfile", undecodable):
        assert main(["-c", str(config), "check-receipt", str(path)]) in (EXIT_USAGE, EXIT_INVALID_CHAIN)
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "\\n" in captured.err, captured.err
    existing = tmp_path / "d\nexisting.receipt"
    existing.write_bytes(b"x")
    assert main(["-c", str(config), "tx", "0" * 64, "--save", str(existing)]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "already exists" in captured.err and "\\n" in captured.err


def test_in_an_honest_simulated_network_only_the_entry_where_a_transaction_executed_has_a_receipt() -> None:
    """The reviewer's deferred_in_simulation.py: clients with several transactions in flight make a
    fault-free network commit "deferred:" entries. Every entry of an honest chain gets a receipt
    that verifies if and only if it is the transaction's outcome, and each transaction has exactly one."""
    scenario = Scenario(seed=1, clients=3, transactions_per_client=12, pipeline_depth=3, delay_ms_min=0, delay_ms_max=20)
    simulation = Simulation(scenario)
    simulation.run()
    network, chain = simulation.network, simulation.replicas[1].chain
    outcomes: dict[bytes, int] = {}
    deferred = 0
    for block in chain:
        query = Query(5, "block-hash", block.height, 0, NONCE)
        replies = []
        for replica_id in (1, 2):
            unsigned = QueryReply(query.query_id, query.digest, replica_id, len(chain), block.block_hash, "")
            replies.append(replace(unsigned, signature=simulation.replica_keys[replica_id].sign(simulation.query_domain, unsigned.signed_bytes())))
        for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
            if is_outcome(result):
                verify_receipt(build_receipt(network, block, index, query, replies), network)
                outcomes[transaction.transaction_id] = outcomes.get(transaction.transaction_id, 0) + 1
                continue
            deferred += is_deferred(result)
            with pytest.raises(ReceiptError, match="not the transaction's outcome"):
                build_receipt(network, block, index, query, replies)
    assert deferred > 0, "the scenario no longer makes deferred entries: pick another seed"
    assert len(outcomes) == 3 * 12 and set(outcomes.values()) == {1}
