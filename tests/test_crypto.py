"""Tests of Ed25519 keys, key files and domain-separated signatures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from chain_helpers import deterministic_key
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ledger.crypto import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    KeyFileError,
    NetworkIdentity,
    PublicKeyCache,
    SigningKey,
    parse_public_key,
    read_key_file,
    signing_domain,
    verify_signature,
    write_key_file,
)

KEYS = [deterministic_key(f"crypto-{index}") for index in range(3)]
OBJECT_TYPES = ["transaction", "pre-prepare", "prepare", "commit", "batch-reply", "query-reply", "handshake"]

network_ids = st.text(min_size=1, max_size=24).filter(lambda text: "\x00" not in text)
# Two genesis hashes only, so that one id with two geneses comes up often.
identities = st.builds(NetworkIdentity, network_ids, st.sampled_from([bytes(32), b"\x01" * 32]))
NET = NetworkIdentity("net", bytes(32))
object_types = st.sampled_from(OBJECT_TYPES)
messages = st.binary(max_size=200)


@given(identities, object_types, identities, object_types)
@settings(derandomize=True)
def test_domains_differ_and_none_is_a_prefix_of_another(
    first_network: NetworkIdentity, first_type: str, second_network: NetworkIdentity, second_type: str
) -> None:
    assume((first_network, first_type) != (second_network, second_type))
    first = signing_domain(first_network, first_type)
    second = signing_domain(second_network, second_type)
    assert first != second
    assert not first.startswith(second)
    assert not second.startswith(first)


@given(
    key_index=st.integers(0, len(KEYS) - 1),
    network=identities,
    object_type=object_types,
    other_network=identities,
    other_object_type=object_types,
    message=messages,
)
@settings(derandomize=True, max_examples=60)
def test_a_signature_for_one_domain_fails_in_another(
    key_index: int,
    network: NetworkIdentity,
    object_type: str,
    other_network: NetworkIdentity,
    other_object_type: str,
    message: bytes,
) -> None:
    assume((network, object_type) != (other_network, other_object_type))
    key = KEYS[key_index]
    domain = signing_domain(network, object_type)
    signature = key.sign(domain, message)
    assert verify_signature(key.public_key, domain, message, signature)
    assert not verify_signature(key.public_key, signing_domain(other_network, other_object_type), message, signature)


@given(message=messages, position=st.integers(0, 10_000), flip=st.integers(1, 255))
@settings(derandomize=True, max_examples=60)
def test_tampered_message_or_signature_fails(message: bytes, position: int, flip: int) -> None:
    key = KEYS[0]
    domain = signing_domain(NET, "commit")
    signature = key.sign(domain, message)
    if message:
        tampered_message = bytearray(message)
        tampered_message[position % len(message)] ^= flip
        assert not verify_signature(key.public_key, domain, bytes(tampered_message), signature)
    assert not verify_signature(key.public_key, domain, message + b"\x00", signature)
    tampered_signature = bytearray(signature)
    tampered_signature[position % SIGNATURE_SIZE] ^= flip
    assert not verify_signature(key.public_key, domain, message, bytes(tampered_signature))
    assert not verify_signature(KEYS[1].public_key, domain, message, signature)


@given(public_key=st.binary(max_size=40), signature=st.binary(max_size=70), message=messages)
@settings(derandomize=True, max_examples=100)
def test_verification_of_garbage_returns_false_and_never_raises(
    public_key: bytes, signature: bytes, message: bytes
) -> None:
    domain = signing_domain(NET, "batch-reply")
    assert verify_signature(public_key, domain, message, signature) is False
    assert PublicKeyCache().verify(public_key, domain, message, signature) is False


def test_public_key_cache_agrees_with_verify_signature() -> None:
    cache = PublicKeyCache(size_max=2)
    domain = signing_domain(NET, "prepare")
    for key in KEYS * 2:
        signature = key.sign(domain, b"message")
        assert cache.verify(key.public_key, domain, b"message", signature)
        assert not cache.verify(key.public_key, domain, b"other", signature)
        assert not cache.verify(key.public_key, signing_domain(NET, "commit"), b"message", signature)


def test_signing_is_deterministic_and_keys_round_trip() -> None:
    key = KEYS[0]
    domain = signing_domain(NET, "commit")
    assert key.sign(domain, b"block") == key.sign(domain, b"block")
    again = SigningKey.from_private_bytes(key.private_bytes())
    assert again.public_key == key.public_key
    assert len(key.public_key) == PUBLIC_KEY_SIZE
    assert len(key.sign(domain, b"block")) == SIGNATURE_SIZE
    assert SigningKey.generate().public_key != SigningKey.generate().public_key


def test_key_file_is_private_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "replica.key"
    previous_umask = os.umask(0)
    try:
        write_key_file(path, KEYS[2])
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path).public_key == KEYS[2].public_key
    write_key_file(path, KEYS[1])  # overwriting keeps the mode and replaces the key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path).public_key == KEYS[1].public_key
    assert [entry.name for entry in tmp_path.iterdir()] == ["replica.key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not a pbft-ledger key file"),
        ("some other file\n" + "00" * 32 + "\n", "not a pbft-ledger key file"),
        ("pbft-ledger ed25519 private key v1\nxyz\n", "not hexadecimal"),
        ("pbft-ledger ed25519 private key v1\n" + "00" * 31 + "\n", "must be 32 bytes"),
    ],
)
def test_bad_key_files_raise_key_file_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message):
        read_key_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_others_can_open_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "open.key"
    write_key_file(path, SigningKey.generate())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:o}.*chmod 600"):
        read_key_file(path)


def test_missing_key_file_raises_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(tmp_path / "absent.key")


def test_parse_public_key() -> None:
    key = KEYS[0].public_key
    assert parse_public_key(key.hex()) == key
    with pytest.raises(ValueError, match="not hexadecimal"):
        parse_public_key("zz" * 32)
    with pytest.raises(ValueError, match="expected 32 bytes"):
        parse_public_key(key.hex()[:-2])


def test_handshake_proofs_name_their_role_so_one_cannot_stand_in_for_the_other() -> None:
    """An acceptor's proof (signed before it knows who dialed) is never a valid dialer proof."""
    from ledger.messages import handshake_signed_bytes

    dialer_challenge, acceptor_challenge = b"d" * 32, b"a" * 32
    accept = handshake_signed_bytes("accept", dialer_challenge, acceptor_challenge, 1, 2)
    dial = handshake_signed_bytes("dial", dialer_challenge, acceptor_challenge, 1, 2)
    assert accept != dial
    # A relayed challenge pair in the other direction gives different bytes as well.
    assert handshake_signed_bytes("dial", acceptor_challenge, dialer_challenge, 2, 1) not in (accept, dial)
