"""A tiny, bounded HTTP/1.1 server on Trio streams for a replica's /metrics and /health (one request a connection), and a probe."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ledger.config import Address
from node.log_format import LogRateLimit

# A scraper's GET is a few hundred bytes; anything near this limit is not a scraper.
REQUEST_HEAD_SIZE_MAX = 8 * 1024
REQUEST_HEADERS_MAX = 64
# The whole request head must arrive within this long, and the answer be taken within as long.
REQUEST_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 10.0
# Scrapers and probes are a handful; more connections than this at once are closed on arrival.
HTTP_CONNECTIONS_MAX = 16
RECEIVE_CHUNK_SIZE = 4096
ERRORS_LOGGED_PER_SECOND = 1
METHODS_ALLOWED = ("GET", "HEAD")

log = logging.getLogger("node.http")

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class BadRequest(ValueError):
    """The request cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, include_body: bool = True) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body if include_body else head


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status, (text + "\n").encode(), headers=headers)


def parse_request_head(head: bytes) -> HttpRequest:
    """The request line and headers (the bytes before the blank line), or BadRequest."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request head is not ASCII") from None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, f"unsupported version {version[:16]!r}")
    if not method.isalpha() or not method.isupper() or not target.startswith("/") or not target.isprintable():
        raise BadRequest(400, "malformed request line")
    if len(header_lines) > REQUEST_HEADERS_MAX:
        raise BadRequest(431, f"more than {REQUEST_HEADERS_MAX} headers")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, separator, value = line.partition(":")
        if not separator or not name or name != name.strip() or not name.isprintable():
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        # Nothing served here takes a body; refusing one keeps the connection logic trivial.
        raise BadRequest(400, "a request body is not accepted")
    return HttpRequest(method, target.partition("?")[0], headers)


async def receive_request_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The bytes up to the blank line ending the head (excluded); None if the peer closed first;
    BadRequest(431) past REQUEST_HEAD_SIZE_MAX."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) >= REQUEST_HEAD_SIZE_MAX:
            raise BadRequest(431, f"request head over {REQUEST_HEAD_SIZE_MAX} bytes")
        data = await stream.receive_some(RECEIVE_CHUNK_SIZE)
        if not data:
            return None
        buffer += data


Handler = Callable[[HttpRequest], HttpResponse]


@dataclass(eq=False)
class HttpServer:
    """Serves GET and HEAD of `routes` (path -> handler) to at most `connections_max` connections
    at once, one request each; other paths get 404, other methods 405. A handler runs in the event
    loop (it must not block); an exception in it is contained: answered 500, counted and logged
    (at most one line a second), and the server keeps serving."""

    routes: dict[str, Handler]
    connections_max: int = HTTP_CONNECTIONS_MAX
    connections: int = 0
    refused: int = 0  # over the connection limit
    bad_requests: int = 0  # malformed, oversized or too slow
    errors: int = 0  # exceptions in the handler
    served: dict[int, int] = field(default_factory=dict)  # by status
    error_log: LogRateLimit = field(default_factory=lambda: LogRateLimit(log, ERRORS_LOGGED_PER_SECOND))

    async def serve(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.connections_max:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            await self._serve_one(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        response: HttpResponse | None
        include_body = True
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                head = await receive_request_head(stream)
            if head is None:
                return
            request = parse_request_head(head)
            include_body = request.method != "HEAD"
            response = self._answer(request)
        except trio.TooSlowError:
            self.bad_requests += 1
            response = text_response(408, "request head not received in time")
        except BadRequest as error:
            self.bad_requests += 1
            response = text_response(error.status, str(error))
        self.served[response.status] = self.served.get(response.status, 0) + 1
        with trio.move_on_after(RESPONSE_TIMEOUT_S):
            await stream.send_all(response.encode(include_body))

    def _answer(self, request: HttpRequest) -> HttpResponse:
        handler = self.routes.get(request.path)
        if handler is None:
            return text_response(404, f"not found; try {', '.join(sorted(self.routes))}")
        if request.method not in METHODS_ALLOWED:
            return text_response(405, "only GET and HEAD", (("Allow", ", ".join(METHODS_ALLOWED)),))
        try:
            return handler(request)
        except Exception as error:  # noqa: BLE001 - one request's failure must not stop the replica
            self.errors += 1
            if self.error_log.allowed():
                log.error("internal error answering %s %s (%d so far): %r", request.method, request.path, self.errors, error, exc_info=error)
            return text_response(500, "internal error")


async def http_get(address: Address, path: str, response_size_max: int = 64 * 1024) -> tuple[int, bytes]:
    """GET `path` over a new connection, as a probe does: the status and body. OSError,
    trio.BrokenResourceError or ValueError when no valid answer of at most `response_size_max` came."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        answer = bytearray()
        while data := await stream.receive_some(RECEIVE_CHUNK_SIZE):
            answer += data
            if len(answer) > response_size_max:
                raise ValueError(f"an answer over {response_size_max} bytes")
    head, separator, body = bytes(answer).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not separator or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(parts[1]), body
