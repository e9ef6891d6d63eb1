"""Checks of signed PBFT evidence (votes, prepared and checkpoint certificates, VIEW-CHANGEs), pure.

Every signature is checked through one bounded memo of signatures that verified: a certificate
travels in many messages (each VIEW-CHANGE, each NEW-VIEW that carries it, each re-signed copy a
traitor sends), and must cost its Ed25519 checks once, not once per message that carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from ledger.config import NetworkConfig
from ledger.crypto import SignatureMemo as SignatureMemo  # where the core and its tests find it
from ledger.messages import (
    CheckpointCertificate,
    Prepare,
    PreparedCertificate,
    ViewChange,
    checkpoint_certificate_signers_problem,
)

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]
# Many (public key, domain, message, signature) checks at once, one result each, in order: the
# runtime spreads them over worker threads, the simulator checks them one by one.
SignaturesCheck = Callable[[Sequence[tuple[bytes, bytes, bytes, bytes]]], list[bool]]


def one_by_one(check: SignatureCheck) -> SignaturesCheck:
    """A SignaturesCheck that makes each check in turn with `check`."""
    return lambda items: [check(*item) for item in items]


class CertificateChecks:
    """Says what is wrong with a piece of signed evidence, or None when it holds."""

    def __init__(self, network: NetworkConfig, domains: dict[str, bytes], verify: SignatureCheck, log_size: int) -> None:
        self.network = network
        self.domains = domains
        self.verify = verify
        self.log_size = log_size
        self.replica_count = network.replica_count
        self.quorum = network.quorum
        self.checkpoint_interval = network.protocol.checkpoint_interval

    def signed_by(self, kind: str, message: Any) -> bool:
        """`message` carries a valid signature of the replica it names, in the `kind` domain."""
        if message.replica_id >= self.replica_count:
            return False
        return self.verify(
            self.network.replica_keys[message.replica_id], self.domains[kind], message.signed_bytes(), message.signature
        )

    def checkpoint_certificate_problem(self, certificate: CheckpointCertificate) -> str | None:
        if certificate.sequence % self.checkpoint_interval:
            return "checkpoint certificate for a sequence that is not a checkpoint"
        return checkpoint_certificate_signers_problem(
            certificate, self.network.replica_keys, self.quorum, self.domains["checkpoint"], self.verify
        )

    def prepared_certificate_problem(self, certificate: PreparedCertificate) -> str | None:
        header = certificate.pre_prepare
        primary = self.network.primary(header.view)
        if header.replica_id != primary or not self.signed_by("pre-prepare", header):
            return f"prepared certificate: pre-prepare for sequence {header.sequence} not signed by primary {primary}"
        signers = set()
        for replica_id, signature in certificate.prepares:
            if replica_id in signers or replica_id == primary or replica_id >= self.replica_count:
                return "prepared certificate repeats a signer or counts the primary"
            if not self.signed_by("prepare", Prepare(header.view, header.sequence, header.digest, replica_id, signature)):
                return f"prepared certificate: bad prepare signature from replica {replica_id}"
            signers.add(replica_id)
        if len(signers) < self.quorum - 1:
            return "prepared certificate without enough prepares"
        return None

    def view_change_problem(self, message: ViewChange) -> str | None:
        """Why a VIEW-CHANGE is invalid, or None. Checks every signature it carries (each one
        costs an Ed25519 check only the first time it is seen, in any message)."""
        if not self.signed_by("view-change", message):
            return "bad signature"
        return self.view_change_shape_problem(message) or self.view_change_certificates_problem(message)

    def view_change_shape_problem(self, message: ViewChange) -> str | None:
        """What is wrong with the shape of what a VIEW-CHANGE carries (no signature checked)."""
        checkpoint = message.checkpoint
        if checkpoint is not None and checkpoint.sequence % self.checkpoint_interval:
            return "checkpoint certificate for a sequence that is not a checkpoint"
        low = message.checkpoint_sequence
        sequences: set[int] = set()
        for certificate in message.prepared:
            sequence = certificate.sequence
            if not low < sequence <= low + self.log_size or sequence in sequences:
                return f"prepared certificate for sequence {sequence} outside ({low}, {low + self.log_size}] or repeated"
            sequences.add(sequence)
            if certificate.view >= message.new_view:
                return "prepared certificate from a view not older than the new one"
        return None

    def view_change_certificates_problem(self, message: ViewChange) -> str | None:
        """What is wrong with the signatures of the certificates a well-formed VIEW-CHANGE carries:
        up to 1 + 2f + 1 + L(2f + 1) checks when none was seen before (388 at n = 4, L = 128)."""
        if message.checkpoint is not None:
            problem = self.checkpoint_certificate_problem(message.checkpoint)
            if problem is not None:
                return problem
        for certificate in message.prepared:
            problem = self.prepared_certificate_problem(certificate)
            if problem is not None:
                return problem
        return None


def with_signature(message: Any, signature: bytes) -> Any:
    """The same frozen message, signed."""
    values = {item.name: getattr(message, item.name) for item in fields(message) if item.init and item.name != "signature"}
    return type(message)(**values, signature=signature)
