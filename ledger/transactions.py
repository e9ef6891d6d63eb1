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
        return encode(self.body_plain())

    @classmethod
    def from_plain(cls, plain: Any) -> Transaction:
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

    @classmethod
    def from_plain(cls, plain: Any) -> TransactionResult:
        items = expect_list(plain, "result", length=2)
        if not isinstance(items[0], bool):
            raise CodecError("result ok: expected a boolean")
        return cls(items[0], expect_text(items[1], "result reason", RESULT_REASON_LENGTH_MAX))

    def describe(self) -> str:
        return "ok" if self.ok else f"failed: {self.reason}"
