"""Ed25519 keys, key files, and signatures bound to a domain (network id, genesis hash, object type)."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_KEY_FILE_HEADER = "pbft-ledger ed25519 private key v1"


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or not a key."""


@dataclass(frozen=True, slots=True)
class NetworkIdentity:
    """What every signature of one network is bound to: its id and its genesis hash, which pins
    the replicas' keys and the genesis balances (NetworkConfig.identity)."""

    network_id: str
    genesis_hash: bytes


def signing_domain(network: NetworkIdentity, object_type: str) -> bytes:
    """Prefix for every signed byte string.

    Binding the network's identity and the object type into what is signed means a signature made
    for one purpose (a COMMIT on network A) can never be replayed as another (a PREPARE, or on
    network B), even where B has A's id and replica keys but other genesis balances.
    """
    # Our own bug, not bad input: a bare id here would silently drop the genesis binding.
    assert isinstance(network, NetworkIdentity), f"signing_domain needs a NetworkIdentity, not {type(network).__name__}"
    return f"pbft-ledger/v2\x00{network.network_id}\x00{network.genesis_hash.hex()}\x00{object_type}\x00".encode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key able to sign; deterministic (Ed25519), so it is safe inside the pure core."""

    private_key: Ed25519PrivateKey
    public_key: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private_bytes(Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> SigningKey:
        private_key = Ed25519PrivateKey.from_private_bytes(seed)
        return cls(private_key, private_key.public_key().public_bytes_raw())

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes_raw()

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self.private_key.sign(domain + message)


def verify_signature(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True only for a valid signature by public_key over domain + message; never raises."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain + message)
    except (InvalidSignature, ValueError):
        return False
    return True


class PublicKeyCache:
    """Loaded public keys, so the hot path does not re-parse the same 32 bytes per signature."""

    def __init__(self, size_max: int = 100_000) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        self._size_max = size_max

    def verify(self, public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
        if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False
        key = self._keys.get(public_key)
        if key is None:
            try:
                key = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                return False
            if len(self._keys) >= self._size_max:
                self._keys.clear()
            self._keys[public_key] = key
        try:
            key.verify(signature, domain + message)
        except InvalidSignature:
            return False
        return True


VERIFIED_SIGNATURES_MAX = 65_536


SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]


class SignatureMemo:
    """Ed25519 checks, remembering (bounded, oldest forgotten first) the ones that verified.

    Only successes are kept: a flood of forged signatures cannot push genuine ones out faster
    than it costs the flooder, and a forged signature is never mistaken for a checked one (the
    key is a SHA-256 over the public key, signature, domain and message, fixed sizes first).
    """

    def __init__(self, check: SignatureCheck, entries_max: int = VERIFIED_SIGNATURES_MAX) -> None:
        self.check = check
        self.entries_max = entries_max
        self.verified: OrderedDict[bytes, None] = OrderedDict()
        self.checks = 0  # Ed25519 verifications actually run (the rest were remembered)

    def verify(self, public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
        if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            return False  # and the fixed sizes keep the memo key below unambiguous
        key = hashlib.sha256(
            public_key + signature + len(domain).to_bytes(4, "big") + domain + message
        ).digest()
        if key in self.verified:
            self.verified.move_to_end(key)
            return True
        self.checks += 1
        if not self.check(public_key, domain, message, signature):
            return False
        self.verified[key] = None
        if len(self.verified) > self.entries_max:
            self.verified.popitem(last=False)
        return True


def write_key_file(path: Path, key: SigningKey) -> None:
    """Write a private key readable only by its owner (mode 0600), created atomically."""
    text = f"{_KEY_FILE_HEADER}\n{key.private_bytes().hex()}\n"
    temporary = path.with_name(path.name + ".tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, text.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except OSError as error:
        raise KeyFileError(f"{path}: cannot write key file: {error.strerror or error}") from None


def read_key_file(path: Path) -> SigningKey:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read key file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a pbft-ledger key file") from None
    if mode & 0o077:
        # Like ssh: a private key others can read (or replace) is no longer private.
        raise KeyFileError(
            f"{path}: private key file is readable by others (mode {mode & 0o777:o}); fix with: chmod 600 {path}"
        )
    lines = text.split()
    if len(lines) < 2 or " ".join(text.splitlines()[:1]) != _KEY_FILE_HEADER:
        raise KeyFileError(f"{path}: not a pbft-ledger key file")
    try:
        seed = bytes.fromhex(text.splitlines()[1].strip())
    except ValueError:
        raise KeyFileError(f"{path}: key is not hexadecimal") from None
    if len(seed) != 32:
        raise KeyFileError(f"{path}: key must be 32 bytes, found {len(seed)}")
    return SigningKey.from_private_bytes(seed)


def parse_public_key(text: str, name: str = "public key") -> bytes:
    """Parse a 64-character hex public key, as written in configs and on the command line."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{name}: not hexadecimal") from None
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"{name}: expected {PUBLIC_KEY_SIZE} bytes (64 hex digits), got {len(raw)}")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(f"{name}: not a valid Ed25519 public key") from None
    return raw
