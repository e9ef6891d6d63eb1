"""Proof that one replica signed two conflicting messages for one slot, checkable by anyone with the public keys.

A replica that signs two PRE-PREPAREs, PREPAREs or COMMITs with different digests for the same
(view, sequence) has broken the protocol: no honest replica ever does (it persists what it signed
before sending and never signs a slot twice). Both signed messages together are the proof. They
share one layout (view, sequence, digest, replica), so the evidence keeps that layout once and the
two digests with their signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledger.blocks import HASH_SIZE, REPLICAS_MAX
from ledger.config import NetworkConfig
from ledger.crypto import SIGNATURE_SIZE, PublicKeyCache, signing_domain
from ledger.encoding import (
    CodecError,
    decode,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.messages import Commit, Prepare, PrePrepareHeader

EVIDENCE_KINDS = ("pre-prepare", "prepare", "commit")

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]


class EvidenceError(ValueError):
    """A piece of evidence does not prove what it claims; the message says why."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """Replica `replica_id` signed two `kind` messages for (view, sequence) naming different digests.

    The first digest is the smaller one, so the same pair always makes the same evidence."""

    kind: str
    view: int
    sequence: int
    replica_id: int
    first_digest: bytes
    first_signature: bytes
    second_digest: bytes
    second_signature: bytes

    @classmethod
    def of(cls, kind: str, one: Any, other: Any) -> Evidence:
        """From two signed messages of one kind and slot (PrePrepareHeader, Prepare or Commit)."""
        first, second = sorted((one, other), key=lambda message: message.digest)
        return cls(
            kind, first.view, first.sequence, first.replica_id, first.digest, first.signature, second.digest, second.signature
        )

    @property
    def key(self) -> tuple[int, str, int, int]:
        """What one piece of evidence is about: at most one is kept per key."""
        return (self.replica_id, self.kind, self.view, self.sequence)

    def messages(self) -> tuple[Any, Any]:
        """The two signed messages, as they travelled."""
        make = {"pre-prepare": PrePrepareHeader, "prepare": Prepare, "commit": Commit}[self.kind]
        return (
            make(self.view, self.sequence, self.first_digest, self.replica_id, self.first_signature),
            make(self.view, self.sequence, self.second_digest, self.replica_id, self.second_signature),
        )

    def signatures_valid(self, network: NetworkConfig, check: SignatureCheck | None = None) -> tuple[bool, bool]:
        """Whether each of the two messages carries the named replica's valid signature."""
        if self.replica_id >= network.replica_count:
            return (False, False)
        verify = check or PublicKeyCache().verify
        public_key = network.replica_keys[self.replica_id]
        domain = signing_domain(network.identity, self.kind)
        first, second = self.messages()
        return (
            verify(public_key, domain, first.signed_bytes(), first.signature),
            verify(public_key, domain, second.signed_bytes(), second.signature),
        )

    def problem(self, network: NetworkConfig, check: SignatureCheck | None = None) -> str | None:
        """Why this does not prove equivocation in `network`, or None when it does."""
        if self.replica_id >= network.replica_count:
            return f"replica {self.replica_id} is not in the network"
        if self.first_digest == self.second_digest:
            return "the two messages name the same digest"
        first_valid, second_valid = self.signatures_valid(network, check)
        if not (first_valid and second_valid):
            which = "neither signature verifies" if not (first_valid or second_valid) else "one signature does not verify"
            return f"{which} against replica {self.replica_id}'s key"
        return None

    def verify(self, network: NetworkConfig, check: SignatureCheck | None = None) -> None:
        problem = self.problem(network, check)
        if problem is not None:
            raise EvidenceError(problem)

    def to_plain(self) -> list[Any]:
        return [
            self.kind,
            self.view,
            self.sequence,
            self.replica_id,
            self.first_digest,
            self.first_signature,
            self.second_digest,
            self.second_signature,
        ]

    @classmethod
    def from_plain(cls, plain: Any) -> Evidence:
        items = expect_list(plain, "evidence", length=8)
        kind = expect_text(items[0], "evidence kind", 16)
        if kind not in EVIDENCE_KINDS:
            raise CodecError(f"evidence kind: expected one of {', '.join(EVIDENCE_KINDS)}")
        return cls(
            kind,
            expect_int(items[1], "view"),
            expect_int(items[2], "sequence", 1),
            expect_int(items[3], "replica", 0, REPLICAS_MAX - 1),
            expect_bytes(items[4], "first digest", HASH_SIZE),
            expect_bytes(items[5], "first signature", SIGNATURE_SIZE),
            expect_bytes(items[6], "second digest", HASH_SIZE),
            expect_bytes(items[7], "second signature", SIGNATURE_SIZE),
        )

    def encode(self) -> bytes:
        return encode(self.to_plain())

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        return cls.from_plain(decode(data))
