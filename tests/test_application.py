"""Tests of the accounts-and-values application: execution, failures, digests, snapshots, queries."""

from __future__ import annotations

from typing import Any

import pytest
from chain_helpers import deterministic_key
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.application import Account, AccountsApplication, is_deferred, is_final, is_replay
from ledger.config import SUPPLY_MAX
from ledger.crypto import NetworkIdentity, SigningKey
from ledger.encoding import INTEGER_MAX, CodecError, decode, encode
from ledger.transactions import Put, Transaction, Transfer, sign_transaction

NETWORK = NetworkIdentity("application-net", bytes(32))
ALICE = deterministic_key("alice")
BOB = deterministic_key("bob")
CAROL = deterministic_key("carol")


def signed(key: SigningKey, nonce: int, operation: Any) -> Transaction:
    return sign_transaction(NETWORK, key, nonce, operation)


def funded() -> AccountsApplication:
    return AccountsApplication({ALICE.public_key: 100, BOB.public_key: 50})


def test_transfer_moves_funds_and_consumes_the_nonce() -> None:
    application = funded()
    results = application.execute_block(
        [signed(ALICE, 0, Transfer(BOB.public_key, 30)), signed(ALICE, 1, Transfer(CAROL.public_key, 70))]
    )
    assert [result.ok for result in results] == [True, True]
    assert application.account(ALICE.public_key) == Account(0, 2)
    assert application.account(BOB.public_key) == Account(80, 0)
    assert application.account(CAROL.public_key) == Account(70, 0)


def test_transfer_to_oneself_keeps_the_balance() -> None:
    application = funded()
    [result] = application.execute_block([signed(ALICE, 0, Transfer(ALICE.public_key, 100))])
    assert result.ok
    assert application.account(ALICE.public_key) == Account(100, 1)


def test_put_writes_a_value_and_consumes_the_nonce() -> None:
    application = funded()
    results = application.execute_block([signed(CAROL, 0, Put("colour", "blue")), signed(CAROL, 1, Put("colour", "red"))])
    assert all(result.ok for result in results)
    assert application.query("get", "colour") == "red"
    assert application.account(CAROL.public_key) == Account(0, 2)


def test_a_nonce_ahead_is_deferred_without_consuming_the_nonce() -> None:
    application = funded()
    digest_before = application.state_digest()
    results = application.execute_block(
        [signed(ALICE, 1, Transfer(BOB.public_key, 10)), signed(ALICE, 5, Put("key", "value"))]
    )
    assert [result.ok for result in results] == [False, False]
    assert results[0].reason == "deferred: nonce 1 is ahead of the next nonce 0"
    assert all(is_deferred(result) and not is_final(result) for result in results)
    assert application.account(ALICE.public_key) == Account(100, 0)
    assert application.query("get", "key") is None
    assert application.state_digest() == digest_before


def test_replayed_transaction_fails_the_second_time() -> None:
    application = funded()
    transfer = signed(ALICE, 0, Transfer(BOB.public_key, 10))
    first, second = application.execute_block([transfer, transfer])
    assert first.ok
    assert not second.ok
    assert is_replay(second) and "already used" in second.reason
    assert application.account(ALICE.public_key) == Account(90, 1)
    assert application.check(transfer) == "nonce 0 already used (next is 1)"
    assert application.check(signed(ALICE, 1, Transfer(BOB.public_key, 1))) is None
    assert application.check(signed(ALICE, 7, Transfer(BOB.public_key, 1))) is None


def test_insufficient_funds_fails_but_consumes_the_nonce() -> None:
    application = funded()
    [result] = application.execute_block([signed(ALICE, 0, Transfer(BOB.public_key, 101))])
    assert not result.ok
    assert result.reason == "insufficient funds: balance 100, amount 101"
    assert application.account(ALICE.public_key) == Account(100, 1)
    assert application.account(BOB.public_key) == Account(50, 0)
    [unfunded] = application.execute_block([signed(CAROL, 0, Transfer(BOB.public_key, 1))])
    assert not unfunded.ok
    assert application.account(CAROL.public_key) == Account(0, 1)
    [next_one] = application.execute_block([signed(ALICE, 1, Transfer(BOB.public_key, 100))])
    assert next_one.ok


def test_state_digest_is_deterministic_and_tracks_the_state() -> None:
    first, second = funded(), funded()
    assert first.state_digest() == second.state_digest()
    assert len(first.state_digest()) == 32
    block = [signed(ALICE, 0, Transfer(BOB.public_key, 5)), signed(BOB, 0, Put("a", "1"))]
    first.execute_block(block)
    assert first.state_digest() != second.state_digest()
    second.execute_block(block)
    assert first.state_digest() == second.state_digest()
    assert AccountsApplication({}).state_digest() != funded().state_digest()


def test_two_puts_in_either_order_give_the_same_digest() -> None:
    forwards, backwards = funded(), funded()
    forwards.execute_block([signed(ALICE, 0, Put("left", "1")), signed(BOB, 0, Put("right", "2"))])
    backwards.execute_block([signed(BOB, 0, Put("right", "2")), signed(ALICE, 0, Put("left", "1"))])
    assert forwards.state_digest() == backwards.state_digest()
    assert forwards.snapshot() == backwards.snapshot()


def test_genesis_order_does_not_matter_and_values_are_distinguished() -> None:
    balances = {ALICE.public_key: 1, BOB.public_key: 2, CAROL.public_key: 3}
    reordered = dict(reversed(list(balances.items())))
    assert AccountsApplication(balances).state_digest() == AccountsApplication(reordered).state_digest()
    swapped = {ALICE.public_key: 2, BOB.public_key: 1, CAROL.public_key: 3}
    assert AccountsApplication(balances).state_digest() != AccountsApplication(swapped).state_digest()


def test_digest_depends_on_the_state_not_the_history() -> None:
    direct, roundabout = funded(), funded()
    direct.execute_block(
        [signed(CAROL, 0, Put("key", "old")), signed(CAROL, 1, Put("other", "1")), signed(CAROL, 2, Put("key", "new"))]
    )
    roundabout.execute_block(
        [signed(CAROL, 0, Put("key", "new")), signed(CAROL, 1, Put("key", "old")), signed(CAROL, 2, Put("other", "1"))]
    )
    assert direct.state_digest() != roundabout.state_digest()
    roundabout.execute_block([signed(CAROL, 3, Put("key", "new"))])
    direct.execute_block([signed(CAROL, 3, Put("other", "1"))])
    assert direct.state_digest() == roundabout.state_digest()


operations_strategy = st.lists(
    st.tuples(
        st.sampled_from([ALICE, BOB, CAROL]),
        st.booleans(),
        st.integers(1, 120),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 2),
    ),
    max_size=12,
)


def random_block(choices: list[tuple[SigningKey, bool, int, str, int]]) -> list[Transaction]:
    nonces: dict[bytes, int] = {}
    transactions = []
    for key, is_transfer, amount, put_key, nonce_skew in choices:
        nonce = nonces.get(key.public_key, 0) + (1 if nonce_skew == 2 else 0)
        operation: Any = Transfer(BOB.public_key if key is ALICE else ALICE.public_key, amount) if is_transfer else Put(put_key, str(amount))
        transactions.append(signed(key, nonce, operation))
        if nonce_skew != 2:
            nonces[key.public_key] = nonce + 1
    return transactions


@given(operations_strategy)
@settings(derandomize=True, max_examples=50)
def test_snapshot_round_trip_keeps_state_and_digest(choices: list[tuple[SigningKey, bool, int, str, int]]) -> None:
    application = funded()
    results = application.execute_block(random_block(choices))
    assert len(results) == len(choices)
    restored = AccountsApplication.from_snapshot(decode(encode(application.snapshot())))
    assert restored.state_digest() == application.state_digest()
    assert restored.snapshot() == application.snapshot()
    for key in (ALICE, BOB, CAROL):
        assert restored.query("account", key.public_key) == application.query("account", key.public_key)
    total = sum(application.account(key.public_key).balance for key in (ALICE, BOB, CAROL))
    assert total == 150


@given(operations_strategy)
@settings(derandomize=True, max_examples=30)
def test_execution_is_deterministic(choices: list[tuple[SigningKey, bool, int, str, int]]) -> None:
    block = random_block(choices)
    first, second = funded(), funded()
    assert first.execute_block(block) == second.execute_block(block)
    assert first.state_digest() == second.state_digest()


def test_queries() -> None:
    application = funded()
    application.execute_block([signed(ALICE, 0, Put("name", "alice"))])
    assert application.query("account", ALICE.public_key) == [100, 1]
    assert application.query("account", CAROL.public_key) == [0, 0]
    assert application.query("get", "name") == "alice"
    assert application.query("get", "missing") is None
    with pytest.raises(CodecError, match="unknown"):
        application.query("balance", ALICE.public_key)
    with pytest.raises(CodecError):
        application.query("account", b"short")
    with pytest.raises(CodecError):
        application.query("account", "not bytes")
    with pytest.raises(CodecError):
        application.query("get", b"bytes")


@pytest.mark.parametrize(
    "plain",
    [
        pytest.param([], id="empty"),
        pytest.param([[], [], []], id="three-parts"),
        pytest.param([[[b"x" * 31, 1, 0]], []], id="short-account"),
        pytest.param([[[b"x" * 32, -1, 0]], []], id="negative-balance"),
        pytest.param([[[b"x" * 32, 1]], []], id="account-missing-nonce"),
        pytest.param([[], [["key"]]], id="value-missing"),
        pytest.param([[], [[b"key", "value"]]], id="key-not-text"),
    ],
)
def test_malformed_snapshots_are_refused(plain: Any) -> None:
    with pytest.raises(CodecError):
        AccountsApplication.from_snapshot(plain)


def test_snapshot_of_any_reachable_state_can_be_restored() -> None:
    """Configs cap the genesis total at SUPPLY_MAX and transfers conserve it, so no balance can
    outgrow what a snapshot accepts."""
    half = SUPPLY_MAX // 2
    application = AccountsApplication({ALICE.public_key: half, BOB.public_key: SUPPLY_MAX - half})
    [result] = application.execute_block([signed(ALICE, 0, Transfer(BOB.public_key, half))])
    assert result.ok
    assert application.account(BOB.public_key).balance == SUPPLY_MAX <= INTEGER_MAX
    restored = AccountsApplication.from_snapshot(application.snapshot())
    assert restored.state_digest() == application.state_digest()


def _entry_by_entry(accounts: list[tuple[Any, Any, Any]], values: list[tuple[Any, Any]]) -> AccountsApplication:
    """The application from_entries must equal: every entry written in turn (a later one of a key wins)."""
    application = AccountsApplication.from_snapshot([[list(row) for row in accounts], [list(row) for row in values]])
    application.take_changes()
    return application


@given(
    st.lists(st.tuples(st.sampled_from([bytes([index]) * 32 for index in range(6)]), st.integers(0, INTEGER_MAX), st.integers(0, 9)), max_size=12),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=40)), max_size=30),
)
@settings(derandomize=True, max_examples=80, deadline=None)
def test_from_entries_holds_exactly_the_entries_in_any_order(accounts: list[tuple[bytes, int, int]], values: list[tuple[str, str]]) -> None:
    """Sorted rows (a store's) take the bulk path; unsorted or repeated keys must give the same application."""
    for rows in ((accounts, values), (sorted(accounts), sorted(values)), (accounts[::-1], values[::-1])):
        loaded, expected = AccountsApplication.from_entries(*rows), _entry_by_entry(*rows)
        assert loaded.snapshot() == expected.snapshot()
        assert loaded.state_digest() == expected.state_digest()
        assert loaded.entry_count() == expected.entry_count()
        assert not loaded.take_changes()
        assert list(loaded.values_with_prefix("")) == list(expected.values_with_prefix(""))
        for key, _, _ in accounts:
            assert loaded.account(key) == expected.account(key)
        # It goes on executing like the other one.
        key = deterministic_key("writer")
        for application in (loaded, expected):
            application.execute_block([signed(key, 0, Put("a new key", "v"))])
        assert loaded.state_digest() == expected.state_digest()
        assert loaded.take_changes() == expected.take_changes()


@pytest.mark.parametrize(
    ("accounts", "values", "field"),
    [
        pytest.param([(b"x" * 31, 1, 0)], [], "stored account", id="short-account"),
        pytest.param([("x" * 32, 1, 0)], [], "stored account", id="account-not-bytes"),
        pytest.param([(b"x" * 32, -1, 0)], [], "stored balance", id="negative-balance"),
        pytest.param([(b"x" * 32, INTEGER_MAX + 1, 0)], [], "stored balance", id="balance-too-large"),
        pytest.param([(b"x" * 32, True, 0)], [], "stored balance", id="balance-a-boolean"),
        pytest.param([(b"x" * 32, 1.0, 0)], [], "stored balance", id="balance-a-real"),
        pytest.param([(b"x" * 32, 1, None)], [], "stored nonce", id="nonce-null"),
        pytest.param([], [(b"key", "value")], "stored key", id="key-not-text"),
        pytest.param([], [(7, "value")], "stored key", id="key-an-integer"),
        pytest.param([], [("k" * 257, "value")], "stored key", id="key-too-long"),
        pytest.param([], [("key", b"value")], "stored value", id="value-not-text"),
        pytest.param([], [("key", "v" * ((1 << 16) + 1))], "stored value", id="value-too-long"),
    ],
)
def test_from_entries_refuses_a_malformed_entry_by_name(accounts: list[Any], values: list[Any], field: str) -> None:
    good_accounts, good_values = [(bytes(32), 5, 0), (b"\xff" * 32, 5, 0)], [("a", "x"), ("zz", "y")]
    with pytest.raises(CodecError, match=field):
        AccountsApplication.from_entries(sorted(good_accounts + accounts, key=repr), sorted(good_values + values, key=repr))
