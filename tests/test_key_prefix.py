"""The 'key-prefix' query (get --prefix): what a replica answers, its bounds, and what the client accepts."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from test_client_quorum import (
    CLIENT_KEY,
    NETWORK,
    NONCE,
    FakeLedger,
    HonestReplica,
    ScriptedNetwork,
    scripted_client,
    traitor_answer,
)

from client.library import ClientError, InvalidRequest, parse_key_range
from ledger.application import AccountsApplication
from ledger.messages import (
    KEY_PREFIX_ANSWER_BYTES_MAX,
    KEY_PREFIX_MATCHES_MAX,
    Query,
    QueryReply,
    encode_message,
)
from ledger.transactions import KEY_LENGTH_MAX, VALUE_LENGTH_MAX, Put, sign_transaction
from node.queries import answer_query

SMALLEST_FRAME_SIZE = 64 * 1024  # the least protocol.frame_size_max a network may configure


def application_with(values: dict[str, str]) -> AccountsApplication:
    """Puts executed in the order given (not sorted), one per block, as a replica executes them."""
    application = AccountsApplication(NETWORK.genesis_balances)
    for nonce, (key, value) in enumerate(values.items()):
        application.execute_block([sign_transaction(NETWORK.identity, CLIENT_KEY, nonce, Put(key, value))])
    return application


def ask(application: AccountsApplication, prefix: Any) -> QueryReply:
    return answer_query(Query(1, "key-prefix", prefix, 0, NONCE), 0, application, 3, FakeLedger(3))


def test_a_key_prefix_query_lists_the_matching_keys_in_order_from_writes_in_any_order() -> None:
    application = application_with({"user/b": "2", "other": "x", "user/a": "1", "user": "0", "user0": "y"})
    assert ask(application, "user/").result == [[["user/a", "1"], ["user/b", "2"]], False]
    # Keys written after a prefix read are found too, and an overwrite shows its new value.
    application.execute_block([sign_transaction(NETWORK.identity, CLIENT_KEY, 5, Put("user/0", "first"))])
    application.execute_block([sign_transaction(NETWORK.identity, CLIENT_KEY, 6, Put("user/b", "two"))])
    assert ask(application, "user/").result == [[["user/0", "first"], ["user/a", "1"], ["user/b", "two"]], False]
    assert ask(application, "").result[0] == [
        ["other", "x"], ["user", "0"], ["user/0", "first"], ["user/a", "1"], ["user/b", "two"], ["user0", "y"],
    ]
    assert ask(application, "none").result == [[], False]


def test_a_key_prefix_answer_survives_a_snapshot_round_trip() -> None:
    application = application_with({"k3": "c", "k1": "a", "k2": "b"})
    restored = AccountsApplication.from_snapshot(application.snapshot())
    assert ask(restored, "k").result == ask(application, "k").result == [[["k1", "a"], ["k2", "b"], ["k3", "c"]], False]


def test_a_key_prefix_answer_stops_at_the_entry_limit_and_says_more_match() -> None:
    application = AccountsApplication(NETWORK.genesis_balances)
    for index in range(KEY_PREFIX_MATCHES_MAX + 5):
        application._set_value(f"k{index:05d}", "v")
    many = ask(application, "k").result
    assert len(many[0]) == KEY_PREFIX_MATCHES_MAX and many[1] is True
    assert many[0][-1] == [f"k{KEY_PREFIX_MATCHES_MAX - 1:05d}", "v"]
    exactly = AccountsApplication(NETWORK.genesis_balances)
    for index in range(KEY_PREFIX_MATCHES_MAX):
        exactly._set_value(f"k{index:05d}", "v")
    assert ask(exactly, "k").result[1] is False and len(ask(exactly, "k").result[0]) == KEY_PREFIX_MATCHES_MAX


@pytest.mark.parametrize(
    ("key_length", "value_length", "count"),
    [(KEY_LENGTH_MAX, VALUE_LENGTH_MAX, 20), (1, 12, KEY_PREFIX_MATCHES_MAX + 1), (KEY_LENGTH_MAX, 0, KEY_PREFIX_MATCHES_MAX)],
    ids=["largest-entries", "small-entries", "long-keys"],
)
def test_a_key_prefix_answer_fits_the_smallest_frame_whatever_the_entries(key_length: int, value_length: int, count: int) -> None:
    """Every character 4 bytes of UTF-8 (the worst case): the byte budget, not the count, stops it."""
    application = AccountsApplication(NETWORK.genesis_balances)
    for index in range(count):
        key = f"{index:04d}" + "\U0001f600" * (key_length - 4) if key_length >= 4 else chr(0x10000 + index)
        application._set_value(key, "\U0001f600" * value_length)
    reply = ask(application, "")
    entries, truncated = reply.result
    assert truncated and 0 < len(entries) <= KEY_PREFIX_MATCHES_MAX
    assert sum(len(key.encode()) + len(value.encode()) for key, value in entries) <= KEY_PREFIX_ANSWER_BYTES_MAX
    signed = QueryReply(reply.query_id, reply.query_digest, 0, reply.height, reply.result, reply.error, bytes(64))
    assert len(encode_message(signed)) <= SMALLEST_FRAME_SIZE


@pytest.mark.parametrize("argument", [b"user/", 7, "k" * (KEY_LENGTH_MAX + 1)], ids=["bytes", "integer", "too-long"])
def test_a_key_prefix_query_refuses_what_is_no_key_prefix(argument: Any) -> None:
    reply = ask(application_with({"k": "v"}), argument)
    assert reply.result is None and reply.error == f"key-prefix query: expected text of at most {KEY_LENGTH_MAX} characters", reply


@pytest.mark.parametrize(
    "result",
    [
        None,
        [[["k1", "a"]]],
        [[["k1", "a"]], 1],
        [[["k1", "a"], ["k1", "b"]], False],  # a key twice
        [[["k2", "a"], ["k1", "b"]], False],  # out of order
        [[["x1", "a"]], False],  # not under the prefix
        [[["k1"]], False],
        [[["k1", 5]], False],
        [[["k1", "v" * (VALUE_LENGTH_MAX + 1)]], False],
        [[[f"k{index:05d}", ""] for index in range(KEY_PREFIX_MATCHES_MAX + 1)], True],
    ],
    ids=["none", "no-flag", "flag-not-bool", "duplicate", "unsorted", "outside-prefix", "short-entry", "value-not-text", "value-too-long", "too-many"],
)
def test_the_client_refuses_a_malformed_key_prefix_answer(result: Any) -> None:
    with pytest.raises(ClientError, match="malformed answer to a key-prefix query"):
        parse_key_range("k", result)


async def test_get_prefix_takes_the_answer_a_quorum_signed_not_a_traitors(autojump_clock: trio.testing.MockClock) -> None:
    client = scripted_client()
    values = {"user/b": "2", "user/a": "1", "zzz": "no"}

    def answer(replica_id: int, query: Query, attempt: int) -> QueryReply | None:
        if replica_id == 0:
            return traitor_answer(query, 0, 5, [[["user/a", "forged"]], False])
        return HonestReplica(replica_id, 5, values).answer(query)

    network = ScriptedNetwork(client, answer)
    with trio.fail_after(10):
        found = await client.values_with_prefix("user/")
    assert found.entries == (("user/a", "1"), ("user/b", "2")) and not found.truncated and found.height == 5
    assert [query.kind for query in network.queries] == ["key-prefix"]
    with pytest.raises(InvalidRequest, match=f"at most {KEY_LENGTH_MAX} characters"):
        await client.values_with_prefix("k" * (KEY_LENGTH_MAX + 1))
