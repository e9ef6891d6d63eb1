"""The replica's tiny HTTP server (bounded, one request a connection) and its metrics and health answers."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from ledger.messages import PrePrepare
from node.effects import Send
from node.http import (
    REQUEST_HEAD_SIZE_MAX,
    REQUEST_TIMEOUT_S,
    HttpRequest,
    HttpResponse,
    HttpServer,
    text_response,
)
from node.metrics import (
    PRE_PREPARES_TRACKED_MAX,
    SCRAPE_CACHE_FORMATS_MAX,
    SCRAPE_CACHE_S,
    ReplicaMetrics,
    ReplicaSnapshot,
    health_of,
)

SNAPSHOT = ReplicaSnapshot(
    replica_id=0,
    serving=True,
    height=7,
    view=2,
    view_active=True,
    peers_connected=3,
    peers_needed=2,
    peers_total=3,
    rejections={"wrong view": 4, "bad prepare signature": 1},
    request_queue_depth=5,
    event_queue_depth=0,
    client_connections=2,
    evidence_stored=1,
    clients_timed_out=0,
    fetches_skipped=0,
    late_votes=6,
)


async def exchange(server: HttpServer, request: bytes, close_after_sending: bool = True) -> bytes:
    """Send `request` to `server` over an in-memory stream; everything it answered before closing."""
    client, served = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, served)
        await client.send_all(request)
        answer = b""
        while True:
            data = await client.receive_some(65536)
            if not data:
                break
            answer += data
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


def echo_server() -> HttpServer:
    return HttpServer({"/echo": lambda request: text_response(200, request.method)})


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 200, id="get"),
        pytest.param(b"GET /echo?x=1 HTTP/1.0\r\n\r\n", 200, id="query-string-http-1.0"),
        pytest.param(b"GET /other HTTP/1.1\r\n\r\n", 404, id="unknown-path"),
        pytest.param(b"POST /echo HTTP/1.1\r\n\r\n", 405, id="post"),
        pytest.param(b"DELETE /echo HTTP/1.1\r\n\r\n", 405, id="delete"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-hello-garbage"),
        pytest.param(b"GET /echo\r\n\r\n", 400, id="no-version"),
        pytest.param(b"GET /echo HTTP/2.0\r\n\r\n", 505, id="http-2"),
        pytest.param(b"get /echo HTTP/1.1\r\n\r\n", 400, id="lower-case-method"),
        pytest.param(b"GET echo HTTP/1.1\r\n\r\n", 400, id="target-not-a-path"),
        pytest.param(b"GET /echo HTTP/1.1\r\nno colon here\r\n\r\n", 400, id="header-without-colon"),
        pytest.param(b"GET /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400, id="a-body"),
        pytest.param(b"GET /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, id="chunked"),
        pytest.param(b"GET /echo HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n", 431, id="too-many-headers"),
        pytest.param(b"GET /\xff HTTP/1.1\r\n\r\n", 400, id="not-ascii"),
    ],
)
async def test_requests_get_their_status_and_the_connection_is_closed(request_bytes: bytes, status: int) -> None:
    server = echo_server()
    answer = await exchange(server, request_bytes)
    assert status_of(answer) == status, answer
    assert b"\r\nConnection: close\r\n" in answer
    assert server.connections == 0


async def test_an_oversized_request_head_is_answered_431_and_closed_without_reading_it_all() -> None:
    server = echo_server()
    client, served = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, served)
        # Never a blank line: a server reading until one would buffer without bound.
        await client.send_all(b"GET /echo HTTP/1.1\r\nX: " + b"a" * (REQUEST_HEAD_SIZE_MAX + 4096))
        answer = b""
        while data := await client.receive_some(65536):
            answer += data
    assert status_of(answer) == 431
    assert server.bad_requests == 1


async def test_a_request_that_never_completes_is_timed_out(autojump_clock: trio.testing.MockClock) -> None:
    server = echo_server()
    client, served = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, served)
        await client.send_all(b"GET /echo HTTP/1.1\r\n")  # and nothing more
        started = trio.current_time()
        answer = b""
        while data := await client.receive_some(65536):
            answer += data
    assert status_of(answer) == 408
    assert trio.current_time() - started >= REQUEST_TIMEOUT_S


async def test_a_head_request_gets_headers_only() -> None:
    answer = await exchange(echo_server(), b"HEAD /echo HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 200
    assert b"Content-Length: 5\r\n" in answer and body_of(answer) == b""


async def test_connections_over_the_limit_are_closed_unanswered() -> None:
    server = HttpServer({"/echo": lambda request: text_response(200, "")}, connections_max=2)
    waiting = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):  # two that send nothing yet hold their places
            client, served = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve, served)
            waiting.append(client)
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 2
        answer = await exchange(server, b"GET /echo HTTP/1.1\r\n\r\n")
        assert answer == b"" and server.refused == 1
        for client in waiting:
            await client.send_all(b"GET /echo HTTP/1.1\r\n\r\n")
    assert server.connections == 0
    assert await exchange(server, b"GET /echo HTTP/1.1\r\n\r\n") != b""


async def test_an_exception_in_a_handler_is_answered_500_and_the_server_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("broken handler")

    server = HttpServer({"/broken": broken, "/echo": lambda request: text_response(200, "fine")})
    for _ in range(20):
        assert status_of(await exchange(server, b"GET /broken HTTP/1.1\r\n\r\n")) == 500
    assert body_of(await exchange(server, b"GET /echo HTTP/1.1\r\n\r\n")) == b"fine\n"
    assert server.errors == 20
    logged = [record for record in caplog.records if "internal error answering GET /broken" in record.getMessage()]
    assert 1 <= len(logged) <= 2  # at most one a second


# ---- metrics and health ----


def fake_block(height: int, transactions: int) -> Any:
    return SimpleNamespace(header=SimpleNamespace(height=height), transactions=(None,) * transactions)


def scrape(metrics: ReplicaMetrics, accept: str = "") -> dict[str, Any]:
    response = metrics.metrics_response(HttpRequest("GET", "/metrics", {"accept": accept} if accept else {}))
    assert response.status == 200
    families = text_string_to_metric_families(response.body.decode())
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value for family in families for sample in family.samples}


def test_the_state_and_the_rounds_fed_show_in_the_scrape() -> None:
    moments = iter([10.0, 10.5])
    metrics = ReplicaMetrics(lambda: SNAPSHOT, clock=lambda: next(moments, 11.0))
    pre_prepare = PrePrepare(2, 8, SimpleNamespace(), 0)  # type: ignore[arg-type]
    metrics.round_done([Send(None, pre_prepare)], [], view=2, height=7)  # our own PRE-PREPARE at 10.0
    metrics.round_done([], [fake_block(8, 3)], view=2, height=8)  # committed at 10.5
    metrics.round_done([], [], view=3, height=8)
    samples = scrape(metrics)
    assert samples["ledger_height{}"] == 7
    assert samples["ledger_view{}"] == 2
    assert samples["ledger_peers_connected{}"] == 3
    assert samples['ledger_rejections_total{"reason": "wrong view"}'] == 4
    assert samples["ledger_request_queue_depth{}"] == 5
    assert samples["ledger_client_connections{}"] == 2
    assert samples["ledger_evidence_stored{}"] == 1
    assert samples["ledger_late_votes_total{}"] == 6
    assert samples["ledger_blocks_committed_total{}"] == 1
    assert samples["ledger_transactions_committed_total{}"] == 3
    assert samples["ledger_view_changes_total{}"] == 1
    assert samples['ledger_batch_size_transactions_bucket{"le": "2.0"}'] == 0
    assert samples['ledger_batch_size_transactions_bucket{"le": "5.0"}'] == 1
    assert samples["ledger_commit_latency_seconds_count{}"] == 1
    assert samples["ledger_commit_latency_seconds_sum{}"] == pytest.approx(0.5)
    assert not metrics.pre_prepare_seen_s  # forgotten once committed


def test_each_replica_has_its_own_registry() -> None:
    first, second = ReplicaMetrics(lambda: SNAPSHOT), ReplicaMetrics(lambda: SNAPSHOT)
    first.round_done([], [fake_block(8, 1)], view=0, height=8)
    assert scrape(first)["ledger_blocks_committed_total{}"] == 1
    assert scrape(second)["ledger_blocks_committed_total{}"] == 0


def test_pre_prepare_times_kept_are_bounded() -> None:
    metrics = ReplicaMetrics(lambda: SNAPSHOT, clock=lambda: 1.0)
    for sequence in range(1, 3 * PRE_PREPARES_TRACKED_MAX):
        metrics.pre_prepare_seen(sequence, height=0)
    assert len(metrics.pre_prepare_seen_s) == PRE_PREPARES_TRACKED_MAX
    # Once the chain has passed them, the old entries make room again.
    metrics.pre_prepare_seen(10 * PRE_PREPARES_TRACKED_MAX, height=PRE_PREPARES_TRACKED_MAX)
    assert 10 * PRE_PREPARES_TRACKED_MAX in metrics.pre_prepare_seen_s
    assert len(metrics.pre_prepare_seen_s) == 1


@pytest.mark.parametrize(
    "accept",
    ["text/plain;version=abc", "application/openmetrics-text;version=x.y", "application/openmetrics-text; version=1.0.0", "*/*"],
)
def test_any_accept_header_gets_an_answer(accept: str) -> None:
    """Regression: prometheus_client's choose_encoder raises TypeError on a version it cannot
    compare; such a request now gets the classic text format instead of a 500."""
    metrics = ReplicaMetrics(lambda: SNAPSHOT)
    response = metrics.metrics_response(HttpRequest("GET", "/metrics", {"accept": accept}))
    assert response.status == 200 and b"ledger_height" in response.body


def test_health_is_ok_with_a_quorum_of_peers_and_unavailable_below() -> None:
    assert health_of(SNAPSHOT).healthy
    assert health_of(SNAPSHOT).body == {"status": "ok", "height": 7, "view": 2, "peers": 3}
    alone = health_of(replace(SNAPSHOT, peers_connected=1))
    assert not alone.healthy
    assert alone.body["status"] == "unavailable"
    assert alone.body["reason"] == "connected to 1 of 3 peers, 2 needed for a quorum"
    starting = health_of(replace(SNAPSHOT, serving=False))
    assert not starting.healthy and starting.body["reason"] == "not serving yet"


def test_health_answers_json_with_200_or_503() -> None:
    metrics = ReplicaMetrics(lambda: replace(SNAPSHOT, peers_connected=0))
    response = metrics.health_response(HttpRequest("GET", "/health", {}))
    assert response.status == 503 and response.content_type == "application/json"
    assert json.loads(response.body)["reason"].startswith("connected to 0 of 3 peers")


def test_a_failure_updating_metrics_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def broken_clock() -> float:
        raise RuntimeError("no clock")

    metrics = ReplicaMetrics(lambda: SNAPSHOT, clock=broken_clock)
    for _ in range(3):
        metrics.round_done([], [fake_block(8, 1)], view=0, height=8)  # must not raise into the event loop
    assert metrics.failures == 3
    assert 1 <= len([record for record in caplog.records if "updating metrics" in record.getMessage()]) <= 2


def test_a_rendering_is_reused_briefly_and_the_cache_is_bounded() -> None:
    now = [100.0]
    height = [1]
    metrics = ReplicaMetrics(lambda: replace(SNAPSHOT, height=height[0]), clock=lambda: now[0])
    assert scrape(metrics)["ledger_height{}"] == 1
    height[0] = 2
    assert scrape(metrics)["ledger_height{}"] == 1  # within SCRAPE_CACHE_S: the same rendering
    now[0] += SCRAPE_CACHE_S
    assert scrape(metrics)["ledger_height{}"] == 2
    for minor in range(20):  # as many formats as a client cares to name
        metrics.metrics_response(HttpRequest("GET", "/metrics", {"accept": f"application/openmetrics-text; version=1.{minor}.0"}))
    assert len(metrics.rendered) <= SCRAPE_CACHE_FORMATS_MAX
