"""Client transactions: a transfer or a key-value put, signed by the sending account's key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger.crypto import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    NetworkIdentity,
    SigningKey,
    signing_domain,
)
from ledger.encoding import (
    INTEGER_MAX,
    CodecError,
    decode,
    digest,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)

KEY_LENGTH_MAX = 256
VALUE_LENGTH_MAX = 4096
RESULT_REASON_LENGTH_MAX = 256
AMOUNT_MAX = 2**62
# A transaction's body is its encoding without the signature (signed_bytes): the array head of
# 3 items, where the whole has the head of 4, and the encoded signature (head 0x58 0x40) left off.
_BODY_HEAD = b"\x83"
_ENCODED_SIGNATURE_SIZE = 2 + SIGNATURE_SIZE


@dataclass(frozen=True, slots=True)
class Transfer:
    recipient: bytes
    amount: int

    def to_plain(self) -> list[Any]:
        return ["transfer", self.recipient, self.amount]


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str

    def to_plain(self) -> list[Any]:
        return ["put", self.key, self.value]


Operation = Transfer | Put


def operation_from_plain(plain: Any) -> Operation:
    # The common case inline (see Transaction.from_plain); the checks below accept the same.
    if type(plain) is list and len(plain) == 3:
        kind, first, second = plain
        if kind == "put" and type(first) is str and type(second) is str:
            if 0 < len(first) <= KEY_LENGTH_MAX and len(second) <= VALUE_LENGTH_MAX:
                return Put(first, second)
        elif kind == "transfer" and type(first) is bytes and type(second) is int:
            if len(first) == PUBLIC_KEY_SIZE and 1 <= second <= AMOUNT_MAX:
                return Transfer(first, second)
    items = expect_list(plain, "operation", length_max=3)
    if not items:
        raise CodecError("operation: empty")
    kind = expect_text(items[0], "operation kind", 16)
    if kind == "transfer":
        expect_list(items, "transfer", length=3)
        recipient = expect_bytes(items[1], "transfer recipient", PUBLIC_KEY_SIZE)
        amount = expect_int(items[2], "transfer amount", 1, AMOUNT_MAX)
        return Transfer(recipient, amount)
    if kind == "put":
        expect_list(items, "put", length=3)
        key = expect_text(items[1], "put key", KEY_LENGTH_MAX)
        if not key:
            raise CodecError("put key is empty")
        value = expect_text(items[2], "put value", VALUE_LENGTH_MAX)
        return Put(key, value)
    raise CodecError(f"operation kind {kind!r} is unknown")


@dataclass(frozen=True)
class Transaction:
    """A signed client request. Its id is the hash of its canonical encoding, signature included.

    Ed25519 signatures are deterministic and OpenSSL rejects non-canonical ones, so one
    (sender, nonce, operation) has exactly one valid encoding and therefore one id.
    """

    sender: bytes
    nonce: int
    operation: Operation
    signature: bytes
    encoded: bytes = field(init=False, repr=False, compare=False)
    transaction_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        encoded = encode(self.to_plain())
        object.__setattr__(self, "encoded", encoded)
        object.__setattr__(self, "transaction_id", digest(encoded))

    def body_plain(self) -> list[Any]:
        return [self.sender, self.nonce, self.operation.to_plain()]

    def to_plain(self) -> list[Any]:
        return [self.sender, self.nonce, self.operation.to_plain(), self.signature]

    def signed_bytes(self) -> bytes:
        """encode(body_plain()), cut from `encoded` rather than encoded again: the body is the
        same array without its last item, and a 64-byte signature's encoding is its 2-byte head
        and the bytes (the array heads of 3 and 4 items are one byte each)."""
        if type(self.signature) is bytes and len(self.signature) == SIGNATURE_SIZE:
            return _BODY_HEAD + self.encoded[1:-_ENCODED_SIGNATURE_SIZE]
        return encode(self.body_plain())

    @classmethod
    def from_plain(cls, plain: Any, known: KnownTransactions | None = None) -> Transaction:
        """The transaction `plain` describes, validated; with `known`, a transaction decoded
        before from exactly the same values is returned as it is (its encoding and id were
        computed then)."""
        # The common case checked inline (exact types, as `decode` gives them): a batch of
        # transactions is decoded on every replica. Anything else takes the checks below,
        # which accept the same and name what is wrong.
        if type(plain) is list and len(plain) == 4:
            sender, nonce, operation, signature = plain
            if (
                type(sender) is bytes
                and len(sender) == PUBLIC_KEY_SIZE
                and type(nonce) is int
                and 0 <= nonce <= INTEGER_MAX
                and type(signature) is bytes
                and len(signature) == SIGNATURE_SIZE
            ):
                if known is not None:
                    seen = known.get(signature)
                    if seen is not None and seen.sender == sender and seen.nonce == nonce and _exactly(operation, seen.operation.to_plain()):
                        return seen
                return cls(sender, nonce, operation_from_plain(operation), signature)
        items = expect_list(plain, "transaction", length=4)
        return cls(
            sender=expect_bytes(items[0], "transaction sender", PUBLIC_KEY_SIZE),
            nonce=expect_int(items[1], "transaction nonce"),
            operation=operation_from_plain(items[2]),
            signature=expect_bytes(items[3], "transaction signature", SIGNATURE_SIZE),
        )

    @classmethod
    def decode(cls, data: bytes) -> Transaction:
        return cls.from_plain(decode(data))


def _exactly(plain: Any, expected: list[Any]) -> bool:
    """Whether `plain` is the flat list `expected`, item types included: `==` alone takes True
    for 1 and 1.0 for 1, which the validating path refuses."""
    return type(plain) is list and len(plain) == len(expected) and all(type(a) is type(b) and a == b for a, b in zip(plain, expected, strict=True))


KNOWN_TRANSACTIONS_MAX = 16_384


class KnownTransactions:
    """The transactions a replica decoded most recently, by signature (at most `size_max`, the
    oldest forgotten). A backup decodes each client transaction twice: from the client's REQUEST,
    then from the primary's PRE-PREPARE, where re-encoding it canonically and hashing it for its
    id was about a tenth of the backup's event-loop time. Only an exact match is reused, so what a
    PRE-PREPARE decodes to is what it would decode to without this; a forged REQUEST with someone
    else's signature only displaces the entry (that decode then takes the full path)."""

    def __init__(self, size_max: int = KNOWN_TRANSACTIONS_MAX) -> None:
        self.size_max = size_max
        self._by_signature: dict[bytes, Transaction] = {}

    def __len__(self) -> int:
        return len(self._by_signature)

    def add(self, transaction: Transaction) -> None:
        by_signature = self._by_signature
        by_signature.pop(transaction.signature, None)
        by_signature[transaction.signature] = transaction
        if len(by_signature) > self.size_max:
            del by_signature[next(iter(by_signature))]

    def get(self, signature: bytes) -> Transaction | None:
        return self._by_signature.get(signature)


def transaction_domain(network: NetworkIdentity) -> bytes:
    return signing_domain(network, "transaction")


def sign_transaction(network: NetworkIdentity, key: SigningKey, nonce: int, operation: Operation) -> Transaction:
    body = encode([key.public_key, nonce, operation.to_plain()])
    signature = key.sign(transaction_domain(network), body)
    return Transaction(key.public_key, nonce, operation, signature)


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """What executing a transaction did. Failures are recorded with a reason; they never raise."""

    ok: bool
    reason: str = ""

    def to_plain(self) -> list[Any]:
        return [self.ok, self.reason]

    def encoded(self) -> bytes:
        """encode(to_plain()); a success, nearly every result, is one constant."""
        if self.ok is True and self.reason == "":
            return OK_RESULT_ENCODED
        return encode(self.to_plain())

    @classmethod
    def from_plain(cls, plain: Any) -> TransactionResult:
        items = expect_list(plain, "result", length=2)
        if not isinstance(items[0], bool):
            raise CodecError("result ok: expected a boolean")
        return cls(items[0], expect_text(items[1], "result reason", RESULT_REASON_LENGTH_MAX))

    def describe(self) -> str:
        return "ok" if self.ok else f"failed: {self.reason}"


OK_RESULT_ENCODED = encode([True, ""])
