"""The signature memo behind every certificate check: it saves work and never a check."""

from __future__ import annotations

import hashlib

from ledger.crypto import PublicKeyCache, SigningKey
from node.certificates import SignatureMemo

KEY = SigningKey.from_private_bytes(hashlib.sha256(b"memo").digest())
DOMAIN = b"test/domain"


def counting_memo(entries_max: int = 4) -> SignatureMemo:
    return SignatureMemo(PublicKeyCache().verify, entries_max)


def test_a_good_signature_is_checked_once_and_a_bad_one_every_time() -> None:
    memo = counting_memo()
    signature = KEY.sign(DOMAIN, b"message")
    assert all(memo.verify(KEY.public_key, DOMAIN, b"message", signature) for _ in range(5))
    assert memo.checks == 1
    forged = bytes(64)
    assert not any(memo.verify(KEY.public_key, DOMAIN, b"message", forged) for _ in range(3))
    assert memo.checks == 4


def test_a_remembered_signature_does_not_vouch_for_other_bytes_domains_or_splits() -> None:
    memo = counting_memo()
    signature = KEY.sign(DOMAIN, b"message")
    assert memo.verify(KEY.public_key, DOMAIN, b"message", signature)
    assert not memo.verify(KEY.public_key, DOMAIN, b"messagf", signature)
    # The same concatenated bytes split differently between key and signature are refused.
    assert not memo.verify(KEY.public_key[:31], DOMAIN, b"message", KEY.public_key[31:] + signature)


def test_the_memo_is_bounded_oldest_forgotten_first() -> None:
    memo = counting_memo(entries_max=4)
    signatures = [KEY.sign(DOMAIN, bytes([index])) for index in range(6)]
    for index, signature in enumerate(signatures):
        assert memo.verify(KEY.public_key, DOMAIN, bytes([index]), signature)
    assert len(memo.verified) == 4
    checks = memo.checks
    assert memo.verify(KEY.public_key, DOMAIN, bytes([0]), signatures[0])
    assert memo.checks == checks + 1
