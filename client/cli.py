"""`ledger-client`: submit transactions and read the ledger from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from client.completion import add_completion_command, completion_script
from client.library import (
    Client,
    ClientError,
    HistoryPruned,
    InvalidRequest,
    NetworkUnavailable,
    TransactionRejected,
    open_client,
)
from client.quorum import Receipt
from client.watch import BlockFollower
from ledger.blocks import Block, ChainError, prove_transaction
from ledger.config import ConfigError, load_client_config
from ledger.crypto import KeyFileError, SigningKey, parse_public_key, read_key_file, write_key_file
from ledger.messages import (
    KEY_PREFIX_ANSWER_BYTES_MAX,
    KEY_PREFIX_MATCHES_MAX,
    TRANSACTION_PREFIX_LENGTH_MIN,
    TRANSACTION_PREFIX_MATCHES_MAX,
)
from ledger.receipts import (
    ReceiptError,
    read_receipt_file,
    receipt_size_max,
    shown_path,
    verify_receipt,
    write_receipt_file,
)
from ledger.transactions import (
    AMOUNT_MAX,
    KEY_LENGTH_MAX,
    VALUE_LENGTH_MAX,
    Put,
    Transaction,
    TransactionResult,
    Transfer,
)
from ledger.version import package_version

EXIT_OK = 0
EXIT_FAILED = 1  # the transaction executed but failed, or was refused
EXIT_USAGE = 2  # bad arguments, config or key
EXIT_UNAVAILABLE = 3  # not enough replicas answered
EXIT_INVALID_CHAIN = 4  # verification found a bad block, or a receipt does not verify
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# --timeout: below this a replica cannot even answer on localhost; above it is a typo.
TIMEOUT_MIN_S = 0.1
TIMEOUT_MAX_S = 86_400.0

EXAMPLES = """\
examples:
  ledger-client -c net/client.toml status
  ledger-client -c net/client.toml transfer 3f1c...e9 25
  ledger-client -c net/client.toml put greeting hello
  ledger-client -c net/client.toml get greeting
  ledger-client -c net/client.toml get --prefix user/
  ledger-client -c net/client.toml watch --prefix user/
  ledger-client -c net/client.toml --min-height 7 get greeting   (7: the block a put printed)
  ledger-client -c net/client.toml balance
  ledger-client -c net/client.toml block 1
  ledger-client -c net/client.toml verify --replica 2
  ledger-client -c net/client.toml evidence --replica 0
  ledger-client -c net/client.toml tx 3f1c9a07 --save put.receipt
  ledger-client -c net/client.toml check-receipt put.receipt          (offline)
  ledger-client keygen --out alice.key
  ledger-client -c net/client.toml --key alice.key balance

exit codes: 0 ok, 1 transaction failed or refused, 2 bad arguments or config,
            3 network unavailable, 4 chain or receipt verification failed
"""


class UsageError(Exception):
    """A command-line argument is wrong; the message says which."""


def _account(text: str) -> bytes:
    """An account: 64 hex digits, or the path of a key file whose public key is meant."""
    if len(text) == 64:
        try:
            return parse_public_key(text, "account")
        except ValueError as error:
            raise UsageError(str(error)) from None
    path = Path(text)
    if path.exists():
        try:
            return read_key_file(path).public_key
        except KeyFileError as error:
            raise UsageError(str(error)) from None
    raise UsageError(f"account {text!r}: expected 64 hex digits or a key file")


def _whole_number(text: str, expected: str, minimum: int, maximum: int | None, out_of_range: str) -> int:
    """`text` as an int from minimum to maximum, or an argparse error in one line."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise argparse.ArgumentTypeError(out_of_range)
    return number


def _amount(text: str) -> int:
    return _whole_number(text, "a whole number", 1, AMOUNT_MAX, f"must be between 1 and {AMOUNT_MAX}")


def _height(text: str) -> int:
    return _whole_number(text, "a block height", 1, None, "heights start at 1")


def _min_height(text: str) -> int:
    return _whole_number(text, "a block height", 0, None, "must be 0 or more")


def _count(text: str) -> int:
    return _whole_number(text, "a whole number", 1, None, "must be 1 or more")


def add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name (as etcdctl's do). After the
    command they default to SUPPRESS, so one given before it is not overwritten by a default."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=default(Path(os.environ.get("LEDGER_CLIENT_CONFIG", "client.toml"))),
        help="the network's client.toml (default: $LEDGER_CLIENT_CONFIG or ./client.toml)",
    )
    parser.add_argument("--key", dest="key_file", type=Path, default=default(None), help="act as the account of this key file (default: the config's client.key)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for programs instead of text")
    parser.add_argument("--timeout", type=_timeout, default=default(30.0), metavar="SECONDS", help="seconds to wait for the network (default: 30)")
    parser.add_argument(
        "--min-height",
        type=_min_height,
        default=default(0),
        metavar="HEIGHT",
        help="read only from state at least this high, e.g. the block a put or transfer printed, so this "
        "read sees that write (within one run the client does this by itself; default: 0)",
    )


def _timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not TIMEOUT_MIN_S <= seconds <= TIMEOUT_MAX_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be between {TIMEOUT_MIN_S:g} and {TIMEOUT_MAX_S:g} seconds, got {text}")
    return seconds


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit 2), like every other error of this program."""

    def error(self, message: str) -> NoReturn:
        program = self.prog.split()[0]
        self.exit(2, f"{program}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ledger-client",
        description="Talk to a PBFT ledger network: a result counts only when f+1 replicas signed it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ledger-client {package_version()}")
    add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below; `ledger-client COMMAND --help` explains its arguments")

    transfer = commands.add_parser("transfer", help="move funds to another account")
    transfer.add_argument("to", help="recipient: 64 hex digits or a key file")
    transfer.add_argument("amount", type=_amount, help=f"a whole number from 1 to {AMOUNT_MAX}")
    put = commands.add_parser("put", help="set a key to a value")
    put.add_argument("key", help=f"the key, 1 to {KEY_LENGTH_MAX} characters")
    put.add_argument("value", help=f"its new value, up to {VALUE_LENGTH_MAX} characters")
    get = commands.add_parser("get", help="read a key, or every key starting with --prefix (a quorum of replicas must agree)")
    get.add_argument("key", nargs="?", help="the key to read (or give --prefix instead)")
    add_get_prefix_option(get)
    balance = commands.add_parser("balance", help="an account's balance and next nonce (default: yours)")
    balance.add_argument("account", nargs="?", help="64 hex digits or a key file")
    block = commands.add_parser("block", help="show a block and check its commit certificate")
    block.add_argument("height", type=_height, nargs="?", help="a block height, from 1 (default: the latest block)")
    transaction = commands.add_parser("tx", help="find a transaction by id and check its proof")
    transaction.add_argument("transaction_id", help=f"64 hex digits, or a unique prefix of {TRANSACTION_PREFIX_LENGTH_MIN} or more")
    commands.add_parser("status", help="each replica's view, primary, height and last block")
    evidence = commands.add_parser("evidence", help="replicas caught signing two conflicting messages, signatures checked here")
    evidence.add_argument("--replica", type=int, default=None, help="only evidence against this replica id (default: against any replica)")
    verify = commands.add_parser("verify", help="download one replica's chain and check all of it (or, with --from-checkpoint, its recent part)")
    verify.add_argument("--replica", type=int, default=0, help="which replica to download from (default: 0)")
    verify.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="start at the replica's newest stable checkpoint (its 2f+1 signatures checked here) instead of genesis: "
        "checks the blocks after it (links, certificates), not their execution; works on pruned replicas",
    )
    keygen = commands.add_parser("keygen", help="create a new account key file")
    keygen.add_argument("--out", type=Path, required=True, help="where to write the key file (required; mode 0600; an existing file is refused unless --force)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    commands.add_parser("whoami", help="the account (public key) this client acts as")
    add_receipt_commands(commands, transaction)
    add_watch_parser(commands)
    add_completion_command(commands, "ledger-client")
    for command in commands.choices.values():
        add_global_options(command, suppress=True)
    return parser


def add_receipt_commands(commands: Any, transaction: argparse.ArgumentParser) -> None:
    """`tx --save FILE [--force]` and `check-receipt FILE` (offline receipts)."""
    transaction.add_argument(
        "--save",
        type=Path,
        metavar="FILE",
        help="also write a receipt FILE that check-receipt verifies offline with only the network's public keys "
        f"(at most {receipt_size_max():,} bytes; refuses an existing FILE unless --force)",
    )
    transaction.add_argument("--force", action="store_true", help="with --save: replace an existing FILE")
    check = commands.add_parser(
        "check-receipt",
        help="verify a receipt file offline, with only the config's public keys (exit 4 if it fails)",
        description="Check a receipt written by `tx ID --save FILE` without contacting the network: transaction hash, "
        "Merkle paths, block header, commit certificate (2f+1 distinct replicas) and f+1 signatures over the block "
        "hash, for the config's network.",
    )
    check.add_argument("file", type=Path, help=f"a receipt file (at most {receipt_size_max():,} bytes)")


def command_check_receipt(arguments: argparse.Namespace, output: Output) -> int:
    """Verify a receipt file with the client config's network alone; no connection is opened."""
    network = load_client_config(arguments.config).network
    try:
        receipt = read_receipt_file(arguments.file)
    except OSError as error:
        raise UsageError(f"cannot read {shown_path(arguments.file)}: {error.strerror or error}") from None
    try:
        checked = verify_receipt(receipt, network)
    except ReceiptError as error:
        raise ReceiptError(f"{shown_path(arguments.file)}: {error}") from None
    transaction, result, header = receipt.transaction, receipt.result, receipt.header
    output.emit(
        {
            "valid": True,
            "network": network.network_id,
            "transaction_id": transaction.transaction_id.hex(),
            "sender": transaction.sender.hex(),
            "nonce": transaction.nonce,
            "operation": describe_operation(transaction.operation),
            "ok": result.ok,
            "reason": result.reason,
            "height": header.height,
            "block_hash": header.block_hash.hex(),
            "index": receipt.index,
            "certificate_signers": list(checked.certificate_signers),
            "block_hash_signers": list(checked.block_hash_signers),
        },
        f"receipt verified offline: transaction {transaction.transaction_id.hex()}\n"
        f"  {describe_operation(transaction.operation)}\n"
        f"  from {transaction.sender.hex()} nonce {transaction.nonce}\n  result: {result.describe()}\n"
        f"  in block {header.height} (hash {_short(header.block_hash)}) at index {receipt.index} of {receipt.leaf_count}, "
        f"network {network.network_id!r}\n"
        f"  Merkle paths to the transactions and results roots checked; commit certificate signed by replicas "
        f"{', '.join(map(str, checked.certificate_signers))} (2f+1 = {network.quorum} needed); block hash signed by "
        f"replicas {', '.join(map(str, checked.block_hash_signers))} (f+1 = {network.reply_quorum} needed)",
    )
    return EXIT_OK


def check_receipt_target(arguments: argparse.Namespace) -> None:
    """Refuse `tx --save FILE` before asking the network when FILE exists and --force is not given."""
    if arguments.command != "tx":
        return
    if arguments.force and arguments.save is None:
        raise UsageError("--force replaces a receipt file: it needs --save FILE")
    if arguments.save is not None and arguments.save.exists() and not arguments.force:
        raise UsageError(f"{shown_path(arguments.save)}: already exists (use --force to overwrite)")


async def save_receipt(arguments: argparse.Namespace, client: Client, block: Block, index: int) -> None:
    receipt = await client.transaction_receipt(block, index, arguments.timeout)
    try:
        write_receipt_file(arguments.save, receipt, arguments.force)
    except FileExistsError:
        raise UsageError(f"{shown_path(arguments.save)}: already exists (use --force to overwrite)") from None
    except OSError as error:
        raise UsageError(f"cannot write {shown_path(arguments.save)}: {error.strerror or error}") from None


def _short(data: bytes) -> str:
    return data.hex()[:16]


def _duration(seconds: int) -> str:
    """Like 45s, 12m05s, 3h07m, 9d04h: two units at most, for a status column."""
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    if days:
        return f"{days}d{hour:02d}h"
    if hours:
        return f"{hours}h{minute:02d}m"
    if minutes:
        return f"{minutes}m{second:02d}s"
    return f"{second}s"


def _size(size_bytes: int) -> str:
    """Like 812 B, 4.0 KiB, 12.3 MiB, 1.5 GiB."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size = size_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: dict[str, Any], text: str) -> None:
        print(json.dumps(data, sort_keys=True) if self.as_json else text, flush=True)


def receipt_data(receipt: Receipt) -> dict[str, Any]:
    return {
        "transaction_id": receipt.transaction_id.hex(),
        "ok": receipt.result.ok,
        "reason": receipt.result.reason,
        "height": receipt.height,
        "block_hash": receipt.block_hash.hex(),
        "index": receipt.index,
        "confirmed_by": list(receipt.replicas),
    }


def receipt_text(receipt: Receipt, client: Client, what: str) -> str:
    outcome = "committed" if receipt.result.ok else f"FAILED ({receipt.result.reason})"
    replicas = ", ".join(str(replica) for replica in receipt.replicas)
    return (
        f"{what}: {outcome}\n"
        f"  transaction {receipt.transaction_id.hex()}\n"
        f"  block {receipt.height} (hash {_short(receipt.block_hash)}), index {receipt.index}\n"
        f"  confirmed by replicas {replicas}: {len(receipt.replicas)} matching signed replies, f+1 = {client.network.reply_quorum} needed"
    )


def block_data(block: Block) -> dict[str, Any]:
    header = block.header
    return {
        "height": header.height,
        "hash": header.block_hash.hex(),
        "parent_hash": header.parent_hash.hex(),
        "view": header.view,
        "proposer": header.proposer,
        "transactions_root": header.transactions_root.hex(),
        "state_digest": header.state_digest.hex(),
        "timestamp_ms": header.timestamp_ms,
        "certificate": None
        if block.certificate is None
        else {"view": block.certificate.view, "signers": [replica for replica, _ in block.certificate.signatures]},
        "transactions": [
            {
                "id": transaction.transaction_id.hex(),
                "sender": transaction.sender.hex(),
                "nonce": transaction.nonce,
                "operation": describe_operation(transaction.operation),
                "ok": result.ok,
                "reason": result.reason,
            }
            for transaction, result in zip(block.transactions, block.results, strict=True)
        ],
    }


def describe_operation(operation: Any) -> str:
    if isinstance(operation, Transfer):
        return f"transfer {operation.amount} to {operation.recipient.hex()}"
    if isinstance(operation, Put):
        return f"put {operation.key!r} = {operation.value!r}"
    return repr(operation)


def block_text(block: Block) -> str:
    data = block_data(block)
    signers = ", ".join(str(s) for s in data["certificate"]["signers"]) if data["certificate"] else "none"
    lines = [
        f"block {data['height']}  hash {data['hash']}",
        f"  parent {data['parent_hash']}",
        f"  proposed in view {data['view']} by replica {data['proposer']}, timestamp {data['timestamp_ms']} ms",
        f"  transactions root {_short(block.header.transactions_root)}, state digest {_short(block.header.state_digest)}",
        f"  commit certificate: view {block.certificate.view if block.certificate else '-'}, signed by replicas {signers} (verified)",
        "  block hash vouched for by f+1 replicas' signed answers (covers results and state digest)",
        f"  {len(block.transactions)} transaction(s):",
    ]
    for item in data["transactions"]:
        outcome = "ok" if item["ok"] else f"failed: {item['reason']}"
        lines.append(f"    {item['id'][:16]}  from {item['sender'][:16]}  nonce {item['nonce']}  {item['operation']}  -> {outcome}")
    return "\n".join(lines)


async def run_command(arguments: argparse.Namespace, output: Output) -> int:
    async with open_client(arguments.config, arguments.key_file) as client:
        client.raise_read_floor(arguments.min_height)
        if arguments.command == "watch":
            return await command_watch(arguments, client, output)  # runs until --count or Ctrl-C
        with trio.fail_after(arguments.timeout + 5):
            return await dispatch(arguments, client, output)


async def dispatch(arguments: argparse.Namespace, client: Client, output: Output) -> int:
    command = arguments.command
    if command == "transfer":
        recipient = _account(arguments.to)
        receipt = await client.execute(Transfer(recipient, arguments.amount), arguments.timeout)
        output.emit(receipt_data(receipt), receipt_text(receipt, client, f"transfer {arguments.amount} to {_short(recipient)}"))
        return EXIT_OK if receipt.result.ok else EXIT_FAILED
    if command == "put":
        receipt = await client.execute(Put(arguments.key, arguments.value), arguments.timeout)
        output.emit(receipt_data(receipt), receipt_text(receipt, client, f"put {arguments.key!r}"))
        return EXIT_OK if receipt.result.ok else EXIT_FAILED
    if command == "get":
        if arguments.prefix is not None or arguments.key is None:
            return await command_get_prefix(arguments, client, output)
        reply = await client.query("get", arguments.key, arguments.timeout)
        shown = "(not set)" if reply.result is None else reply.result
        output.emit({"key": arguments.key, "value": reply.result, "height": reply.height}, f"{arguments.key} = {shown}   (height {reply.height})")
        return EXIT_OK
    if command == "balance":
        account = _account(arguments.account) if arguments.account else client._require_key().public_key
        balance, nonce = await client.account(account, arguments.timeout)
        output.emit(
            {"account": account.hex(), "balance": balance, "nonce": nonce},
            f"account {account.hex()}\n  balance {balance}\n  next nonce {nonce}",
        )
        return EXIT_OK
    if command == "whoami":
        account = client._require_key().public_key
        output.emit({"account": account.hex()}, account.hex())
        return EXIT_OK
    if command == "block":
        height = arguments.height
        if height is None:
            height = await client.latest_height(arguments.timeout)
            if height == 0:
                raise ClientError("no blocks yet (height 0)")
        block = await client.block(height, arguments.timeout)
        output.emit(block_data(block), block_text(block))
        return EXIT_OK
    if command == "tx":
        text = arguments.transaction_id.lower()
        if not TRANSACTION_PREFIX_LENGTH_MIN <= len(text) <= 64 or not set(text) <= set("0123456789abcdef"):
            raise UsageError(f"transaction id: expected 64 hex digits, or a unique prefix of {TRANSACTION_PREFIX_LENGTH_MIN} or more")
        location: tuple[int, int] | None
        if len(text) == 64:
            transaction_id = bytes.fromhex(text)
            location = await client.locate(transaction_id)
            if location is None:
                output.emit({"transaction_id": text, "found": False}, "no such transaction in the ledger (a quorum of replicas agree)")
                return EXIT_FAILED
        else:
            matches = await client.transactions_with_prefix(text, arguments.timeout)
            if not matches:
                raise ClientError(f"no transaction starts with {text} (a quorum of replicas agree)")
            if len(matches) > 1:
                count = f"more than {TRANSACTION_PREFIX_MATCHES_MAX}" if len(matches) > TRANSACTION_PREFIX_MATCHES_MAX else str(len(matches))
                raise ClientError(f"prefix {text} matches {count} transactions: give more digits")
            transaction_id, *found = matches[0]
            location = (found[0], found[1])
        height, index = location
        block = await client.block(height)
        if index >= len(block.transactions) or block.transactions[index].transaction_id != transaction_id:
            raise ClientError(f"block {height} has no transaction {transaction_id.hex()} at index {index}")
        proof = prove_transaction(block, index)
        proof.verify(client.network.identity, client.network.replica_keys, client.network.quorum)
        transaction, result = block.transactions[index], block.results[index]
        if arguments.save is not None:
            await save_receipt(arguments, client, block, index)
        data = {
            "transaction_id": transaction_id.hex(),
            "found": True,
            "height": height,
            "index": index,
            "block_hash": block.block_hash.hex(),
            "sender": transaction.sender.hex(),
            "nonce": transaction.nonce,
            "operation": describe_operation(transaction.operation),
            "ok": result.ok,
            "reason": result.reason,
        }
        saved = ""
        if arguments.save is not None:
            data["receipt_file"] = str(arguments.save)
            saved = f"\n  receipt written to {shown_path(arguments.save)} (check it offline: ledger-client check-receipt {shown_path(arguments.save)})"
        output.emit(
            data,
            f"transaction {transaction_id.hex()}\n  {describe_operation(transaction.operation)}\n"
            f"  from {transaction.sender.hex()} nonce {transaction.nonce}\n  result: {result.describe()}\n"
            f"  in block {height} (hash {_short(block.block_hash)}) at index {index}; Merkle proof, commit certificate\n"
            f"  and block hash (vouched for by f+1 replicas, it covers the result) verified" + saved,
        )
        return EXIT_OK
    if command == "status":
        statuses = await client.status(wait_s=min(arguments.timeout, 2.0))
        data = {
            "network": client.network.network_id,
            "replicas": [
                {
                    "replica": status.replica_id,
                    "reachable": status.reachable,
                    "view": status.view,
                    "primary": status.primary,
                    "height": status.height,
                    "last_block_hash": status.last_block_hash.hex(),
                    "stable_checkpoint": status.stable_checkpoint,
                    "view_change_in_progress": status.view_changing,
                    "duplicate_identities": {str(peer): connections for peer, connections in status.duplicate_identities},
                    "evidence": status.evidence_count,
                    "version": status.version,
                    "uptime_s": status.uptime_s,
                    "connected_peers": status.connected_peers,
                    "store_size_bytes": status.store_size_bytes,
                    "base_height": status.base_height,
                }
                for status in statuses
            ],
        }
        lines = [
            f"network {client.network.network_id!r}: n={client.network.replica_count}, f={client.network.faults_tolerated}, quorum={client.network.quorum}",
            f"{'replica':>7}  {'state':<11} {'view':>5} {'primary':>7} {'height':>7}  {'kept from':>9}  {'checkpoint':>10}  {'last block':<16}  {'evidence':>8}  {'peers':>5}  {'uptime':>9}  {'store':>9}  version",
        ]
        for status in statuses:
            if not status.reachable:
                lines.append(f"{status.replica_id:>7}  {'unreachable':<11}")
                continue
            state = "view-change" if status.view_changing else "normal"
            lines.append(
                f"{status.replica_id:>7}  {state:<11} {status.view:>5} {status.primary:>7} {status.height:>7}  "
                f"{max(1, status.base_height):>9}  {status.stable_checkpoint:>10}  {_short(status.last_block_hash):<16}  {status.evidence_count:>8}  "
                f"{status.connected_peers:>2}/{client.network.replica_count - 1:<2}  {_duration(status.uptime_s):>9}  "
                f"{_size(status.store_size_bytes):>9}  {status.version}"
            )
        seen_by: dict[int, list[tuple[int, int]]] = {}
        for status in statuses:
            for peer, connections in status.duplicate_identities:
                seen_by.setdefault(peer, []).append((status.replica_id, connections))
        for peer, witnesses in sorted(seen_by.items()):
            named = ", ".join(f"{connections} at replica {witness}" for witness, connections in witnesses)
            lines.append(f"warning: replica {peer}'s key is in use by more than one process (connections from it: {named}); stop the copy")
        output.emit(data, "\n".join(lines))
        reachable = sum(status.reachable for status in statuses)
        return EXIT_OK if reachable >= client.network.quorum else EXIT_UNAVAILABLE
    if command == "evidence":
        if arguments.replica is not None and not 0 <= arguments.replica < client.network.replica_count:
            raise UsageError(f"--replica: expected 0..{client.network.replica_count - 1}")
        reports, answered = await client.evidence(arguments.replica, wait_s=min(arguments.timeout, 2.0))
        entries = [
            {
                "replica": report.evidence.replica_id,
                "kind": report.evidence.kind,
                "view": report.evidence.view,
                "sequence": report.evidence.sequence,
                "digests": [report.evidence.first_digest.hex(), report.evidence.second_digest.hex()],
                "signatures_valid": list(report.signatures_valid),
                "proven": report.proven,
                "reported_by": list(report.reported_by),
            }
            for report in reports
        ]
        lines = [f"evidence from {len(answered)} of {client.network.replica_count} replicas (answered: {answered}):"]
        if not reports:
            lines.append("  none: no replica holds two conflicting signed messages from one replica")
        for report in reports:
            evidence = report.evidence
            verdict = "both signatures verify" if report.proven else f"NOT proven (signatures valid: {list(report.signatures_valid)})"
            lines.append(
                f"  replica {evidence.replica_id} signed two {evidence.kind} messages for view {evidence.view} "
                f"sequence {evidence.sequence}: digests {_short(evidence.first_digest)} and {_short(evidence.second_digest)}; "
                f"{verdict}; reported by {list(report.reported_by)}"
            )
        output.emit({"network": client.network.network_id, "answered": answered, "evidence": entries}, "\n".join(lines))
        return EXIT_OK if answered else EXIT_UNAVAILABLE
    if command == "verify":
        if not 0 <= arguments.replica < client.network.replica_count:
            raise UsageError(f"--replica: expected 0..{client.network.replica_count - 1}")

        def progress(height: int) -> None:
            if not output.as_json:
                print(f"  verified through block {height}", file=sys.stderr, flush=True)

        try:
            if arguments.from_checkpoint:
                report = await client.verify_chain_from_checkpoint(arguments.replica, progress)
            else:
                report = await client.verify_chain(arguments.replica, progress)
        except ChainError as error:
            raise ChainError(f"replica {arguments.replica}'s chain: {error}") from None
        except HistoryPruned as error:
            kept = "" if error.kept_from_height is None else f" (it keeps blocks from height {error.kept_from_height})"
            raise HistoryPruned(
                f"replica {arguments.replica} no longer keeps the whole chain{kept}: its history is pruned, so it cannot be "
                "audited from genesis. Audit it from its newest stable checkpoint with `ledger-client verify --from-checkpoint`, "
                f"or run this against a replica that keeps every block (`ledger-client status`: kept from 1). [{error}]",
                error.kept_from_height,
            ) from None
        data = {
            "replica": report.replica_id,
            "height": report.height,
            "last_block_hash": report.last_block_hash.hex(),
            "transactions": report.transactions,
            "valid": True,
            "from_height": report.from_height,
        }
        if report.from_height:
            data["checkpoint_signers"] = list(report.checkpoint_signers)
            data["re_executed"] = False
            text = (
                f"chain of replica {report.replica_id} verified from its stable checkpoint at height {report.from_height} to "
                f"{report.height}: the start is trusted because replicas {list(report.checkpoint_signers)} ({len(report.checkpoint_signers)} "
                f"of {client.network.replica_count}, a quorum of 2f+1 = {client.network.quorum}) signed its height, block hash and state "
                "digest, and those signatures were checked here; the block served there has that hash and a valid commit certificate. "
                f"The {report.height - report.from_height} blocks after it: every link, transactions root and commit certificate checked "
                f"({report.transactions} transactions); results and state digests not re-executed (that needs the state at the "
                f"checkpoint); last block {_short(report.last_block_hash)}"
            )
        else:
            text = (
                f"chain of replica {report.replica_id} verified: {report.height} blocks, {report.transactions} transactions, "
                f"every link, certificate and state digest checked; last block {_short(report.last_block_hash)}"
            )
        output.emit(data, text)
        return EXIT_OK
    raise UsageError(f"unknown command {command}")


# ---- get --prefix: a range of keys, signed by a quorum as `get` is ----


def add_get_prefix_option(get: argparse.ArgumentParser) -> None:
    get.add_argument(
        "--prefix",
        default=None,
        metavar="PREFIX",
        help=f"every key starting with PREFIX, in order (at most {KEY_PREFIX_MATCHES_MAX} keys or "
        f"{KEY_PREFIX_ANSWER_BYTES_MAX // 1024} KiB; '...' marks more); give no KEY with it",
    )


def printable(text: str) -> str:
    """Text for a terminal: control characters (a line break, an escape) shown escaped, so a
    stored key or value cannot fake lines or move the cursor."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


async def command_get_prefix(arguments: argparse.Namespace, client: Client, output: Output) -> int:
    if arguments.key is not None:
        raise UsageError("get: give either a KEY or --prefix PREFIX, not both")
    if arguments.prefix is None:
        raise UsageError("get: give a KEY, or --prefix PREFIX for every key starting with it")
    prefix = arguments.prefix
    if len(prefix) > KEY_LENGTH_MAX:
        raise UsageError(f"--prefix: {len(prefix)} characters, keys have at most {KEY_LENGTH_MAX}")
    found = await client.values_with_prefix(prefix, arguments.timeout)
    lines = [f"{printable(key)} = {printable(value)}" for key, value in found.entries]
    if found.truncated:
        lines.append(f"... more (one answer holds at most {KEY_PREFIX_MATCHES_MAX} keys or {KEY_PREFIX_ANSWER_BYTES_MAX // 1024} KiB: give a longer prefix)")
    if not found.entries:
        lines.append(f"(no key starts with {printable(prefix)!r})   (height {found.height})")
    data = {
        "prefix": prefix,
        "entries": [{"key": key, "value": value} for key, value in found.entries],
        "truncated": found.truncated,
        "height": found.height,
    }
    output.emit(data, "\n".join(lines))
    return EXIT_OK


# ---- watch: follow new blocks as they commit ----


def add_watch_parser(commands: Any) -> None:
    watch = commands.add_parser(
        "watch",
        help="follow new blocks as they commit, each checked before it is shown (Ctrl-C stops)",
        description="Show blocks as they commit, in order, each once: its commit certificate, its parent "
        "link and the block hash f+1 replicas sign are checked first. One replica's blocks are used at a "
        "time; one that serves a block that does not verify is skipped (said on stderr) and the next asked.",
    )
    watch.add_argument("--from-height", type=_height, default=None, metavar="HEIGHT", help="the first block to show (default: the next to commit)")
    watch.add_argument("--prefix", default=None, metavar="PREFIX", help="show only puts of keys starting with PREFIX")
    watch.add_argument("--account", default=None, metavar="ACCOUNT", help="show only transactions from or to ACCOUNT (64 hex digits or a key file)")
    watch.add_argument("--count", type=_count, default=None, metavar="N", help="stop after N blocks (default: never)")


def watched_transaction_data(block: Block, index: int, transaction: Transaction, result: TransactionResult) -> dict[str, Any]:
    data: dict[str, Any] = {
        "height": block.height,
        "block_hash": block.block_hash.hex(),
        "index": index,
        "transaction_id": transaction.transaction_id.hex(),
        "sender": transaction.sender.hex(),
        "nonce": transaction.nonce,
        "operation": describe_operation(transaction.operation),
        "ok": result.ok,
        "reason": result.reason,
    }
    operation = transaction.operation
    if isinstance(operation, Put):
        data.update(key=operation.key, value=operation.value)
    elif isinstance(operation, Transfer):
        data.update(recipient=operation.recipient.hex(), amount=operation.amount)
    return data


def watched_transaction_text(data: dict[str, Any], transaction: Transaction, as_put: bool, with_height: bool = True) -> str:
    outcome = "" if data["ok"] else f"   FAILED ({printable(data['reason'])})"
    if as_put:
        return f"{printable(data['key'])} = {printable(data['value'])}   (height {data['height']}, tx {data['transaction_id']}){outcome}"
    return (
        f"{'block ' + str(data['height']) + '  ' if with_height else ''}tx {data['transaction_id'][:16]}  from {data['sender'][:16]}  nonce {data['nonce']}  "
        f"{describe_operation(transaction.operation)}  -> {'ok' if data['ok'] else 'failed: ' + printable(data['reason'])}"
    )


def emit_watched_block(block: Block, prefix: str | None, account: bytes | None, output: Output) -> None:
    """The whole block when nothing filters; else one line per transaction that passes every filter."""
    if prefix is None and account is None:
        header = block.header
        signers = [replica for replica, _ in block.certificate.signatures] if block.certificate else []
        lines = [
            f"block {header.height}  hash {_short(header.block_hash)}  parent {_short(header.parent_hash)}  view {header.view}  "
            f"{len(block.transactions)} transaction(s)  (certificate by replicas {signers}, link and hash verified)"
        ]
        for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
            lines.append("    " + watched_transaction_text(watched_transaction_data(block, index, transaction, result), transaction, False, False))
        output.emit(block_data(block), "\n".join(lines))
        return
    for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
        operation = transaction.operation
        if prefix is not None and not (isinstance(operation, Put) and operation.key.startswith(prefix)):
            continue
        if account is not None and transaction.sender != account and not (isinstance(operation, Transfer) and operation.recipient == account):
            continue
        data = watched_transaction_data(block, index, transaction, result)
        output.emit(data, watched_transaction_text(data, transaction, prefix is not None))


async def command_watch(arguments: argparse.Namespace, client: Client, output: Output) -> int:
    prefix = arguments.prefix
    if prefix is not None and len(prefix) > KEY_LENGTH_MAX:
        raise UsageError(f"--prefix: {len(prefix)} characters, keys have at most {KEY_LENGTH_MAX}")
    account = _account(arguments.account) if arguments.account is not None else None
    next_height = arguments.from_height
    if next_height is None:
        next_height = await client.latest_height(arguments.timeout) + 1

    def report(message: str) -> None:
        print(f"ledger-client: watch: {message}", file=sys.stderr, flush=True)

    parent_hash = client.network.genesis_hash if next_height == 1 else None
    follower = BlockFollower(client, next_height, parent_hash, report)
    shown = 0
    try:
        while arguments.count is None or shown < arguments.count:
            for block in await follower.next_blocks():
                emit_watched_block(block, prefix, account, output)
                shown += 1
                if shown == arguments.count:
                    break
    except BrokenPipeError:
        # The reader went away (`watch | head`): stop quietly, and keep Python's exit-time flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def command_keygen(arguments: argparse.Namespace, output: Output) -> int:
    if arguments.out.exists() and not arguments.force:
        raise UsageError(f"{arguments.out}: already exists (use --force to overwrite)")
    key = SigningKey.generate()
    write_key_file(arguments.out, key)
    output.emit(
        {"account": key.public_key.hex(), "key_file": str(arguments.out)},
        f"wrote {arguments.out}\naccount {key.public_key.hex()}",
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    output = Output(arguments.json)
    try:
        if arguments.command == "keygen":
            return command_keygen(arguments, output)
        if arguments.command == "completion":
            print(completion_script(arguments.shell, parser, "ledger-client"), end="")
            return EXIT_OK
        if arguments.command == "check-receipt":
            return command_check_receipt(arguments, output)
        check_receipt_target(arguments)
        return _run_unwrapped(arguments, output)
    except (UsageError, ConfigError, KeyFileError, InvalidRequest) as error:
        print(f"ledger-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TransactionRejected as error:
        print(f"ledger-client: transaction refused: {error}", file=sys.stderr)
        return EXIT_FAILED
    except NetworkUnavailable as error:
        print(f"ledger-client: network unavailable: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except trio.TooSlowError:
        print(f"ledger-client: network unavailable: no answer within {arguments.timeout:g}s (--timeout)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ChainError as error:
        print(f"ledger-client: verification FAILED: {error}", file=sys.stderr)
        return EXIT_INVALID_CHAIN
    except ReceiptError as error:
        print(f"ledger-client: receipt verification FAILED: {error}", file=sys.stderr)
        return EXIT_INVALID_CHAIN
    except ClientError as error:
        print(f"ledger-client: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # quietly, as any Unix tool does on Ctrl-C


def _run_unwrapped(arguments: argparse.Namespace, output: Output) -> int:
    """Run the command; an error that Trio's nurseries wrapped in exception groups is raised
    bare (a Ctrl-C among them wins), so `main` turns it into one line and an exit code."""
    try:
        return trio.run(run_command, arguments, output)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise error from None


if __name__ == "__main__":
    sys.exit(main())
