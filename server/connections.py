"""Client connections: deadlines for slow and idle clients, a bound on how many, and their part in a drain.

Every connection is under one deadline at a time, by phase:

* waiting for request headers: ``HEADER_TIMEOUT_S`` from the connection being
  made, or from the previous response on a keep-alive connection. Past it, a
  connection that had started a request gets 408 and is closed after the
  refusals' linger (below); one that sent nothing is closed. An idle
  keep-alive connection ending so is normal and not counted; a new connection
  that never sent a request is counted as a slow client.
* waiting for the request body: ``REQUEST_TIMEOUT_S`` from the end of the
  headers. Past it the application's wait for the body ends in
  ``RequestTimeout`` (408, the server's error format, ``Connection: close``):
  the answer goes through the application like any other error, so the request
  is counted under its real status. A body still arriving after the request was
  answered (the application did not need it) is cut off at the same deadline.
* the application answering: no deadline here (the batcher's per-request
  deadline and the drain bound it).

Besides, in any phase: a client not reading its answers (an answer waiting unsent in the transport's buffer)
for ``REQUEST_TIMEOUT_S`` has its connection aborted and is counted as a slow client (``pause_writing``); a
request pipelined behind such an answer starts only once it is written out (``on_response_complete``).

A request httptools cannot parse (a garbage request line, an invalid header, a broken chunked encoding) gets
400 in the server's error format (``"type": "malformed_http"``, the parser's reason in ``error``) and
``Connection: close``, instead of uvicorn's plain-text "Invalid HTTP request received.": at once when no request
is being answered (``reason="malformed_http"``); after the answer under way when the garbage follows a complete
request (pipelined); through the application, like an overdue body, when a body being read breaks its framing
(counted as any 400 the application sends, ``reason="invalid"``). Nothing more is read from the connection.
A request line and headers over ``HEAD_MAX_BYTES`` or ``HEAD_MAX_FIELDS`` get 414 / 431 (``"type":
"head_too_large"``) the same way, as soon as the bound is passed (``_count_head``). A refused connection is closed
after ``REFUSAL_LINGER_S`` of reading and discarding, so the close does not reset it before the answer is read.
uvicorn's own WARNING for each such request is let through once a minute, with a count of the rest.

At most ``PIPELINE_MAX`` requests wait behind the one being answered on a connection, and nothing more is read
while any wait; the next is refused with 429 once they are answered (``_stop_pipelining``).

A request asking to upgrade (``Upgrade: h2c``, a WebSocket) is answered as HTTP/1.1, as RFC 9110 lets a server
that switches to no other protocol do (``data_received``).

A client that leaves while its request is answered (the connection ends: a close, a reset, or a half-close, below)
is seen at once, whatever the request's size: once a request is all read, its connection is read again while it is
answered (``_message_complete``); uvicorn stops reading when more than 64 KiB of a body arrive between two reads of
the application, and an application that has its whole body does not read again, so a client leaving after a large
request was seen only when its answer was written (its socket in CLOSE-WAIT meanwhile, its request counted as
answered). A request that asked for it (``cancel_when_client_leaves``: those that classify texts) is then cancelled
(``connection_lost``): its texts not yet on the engine leave the queue (``Batcher.submit``), a batch already running
finishes with its results unused, and it is counted 499 (``client_left``) when it leaves, not when its answer would
have been ready. Other requests run to their end (a key created, a model reloaded) and are counted 499 then.
While requests are pipelined behind the one answered, the connection is not read (``PIPELINE_MAX``), so a client
that leaves then is seen when the request before them is answered.

A client that half-closes its connection after its request (``shutdown(SHUT_WR)``, ``nc -N``) is taken as one that
left (uvicorn's ``eof_received`` closes the transport): HTTP/1.1 lets a client half-close and still read its answer,
but until an answer is written a half-close cannot be told from a close (both are a FIN; only a write would show
which, by a reset), few clients half-close (curl, browsers and the HTTP libraries do not), and dropping the queued
texts of clients that left is what keeps an overloaded server answering those still waiting; nginx
(``proxy_ignore_client_abort off``) and Go's ``net/http`` take a FIN while a request is answered the same way.

Slow clients are counted in ``sentiment_rejected_requests_total{reason="slow_client"}``.
Above ``MAX_CONNECTIONS`` open connections a new one is answered 503 +
Retry-After at once, without reading its request, and closed after a short
linger that reads and discards what it sends (so that the close does not reset
the connection before the client has read the 503);
``reason="too_many_connections"``. ``sentiment_open_connections`` is the count now.

Why a uvicorn protocol subclass: uvicorn has no header or body timeout (its
keep-alive timer is cancelled by the first byte of a request, so one byte every
few seconds holds a connection forever), and its ``limit_concurrency`` answers
in plain text after reading the headers. The application never sees a
connection whose headers have not arrived, so an ASGI middleware could bound
the body but neither the headers nor the number of connections; a protocol
subclass bounds all three in one place. It builds on the httptools protocol
``uvicorn[standard]`` uses: its parser callbacks, ``cycle`` (the request being
answered) and the ``app`` it runs; tests/test_slow_clients.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import math
import re
import socket
import sys
import weakref
from collections.abc import Callable
from typing import Literal

import httptools
import orjson
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.config import Settings
from server.metrics import Metrics
from server.primitives import ServerError
from server.store.throttle import Throttle

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what uvicorn writes for ``Expect: 100-continue``
ANSWERING = "sentiment.answering"  # scope key: the uvicorn cycle answering the request (``client_left``)
CANCEL_ON_LEAVE = "sentiment.cancel_on_leave"  # scope key: cancel the request if its client leaves
CANCELLED_ON_LEAVE = "sentiment.cancelled_on_leave"  # scope key: it was cancelled so (``_run_application``)
WRITTEN_OUT = "sentiment.written_out"  # scope key: the connection's flow control, weakly (``written_out``)
SEND_BUFFER_BYTES = 64 * 1024  # a connection's kernel send buffer (SO_SNDBUF; Linux doubles it): ``connection_made``
REFUSAL_LINGER_S = 1.0  # how long a refused connection is read (and discarded) before it is closed
HEAD_MAX_BYTES = 64 * 1024  # a request's URL and header names and values together (414 / 431 beyond)
HEAD_MAX_FIELDS = 100  # header fields per request, as Apache's LimitRequestFields (431 beyond)
UNPARSED_MAX_BYTES = HEAD_MAX_BYTES  # bytes the parser may take without finishing anything (``_feed``)
PIPELINE_MAX = 64  # requests read and waiting behind the one being answered, per connection (429 beyond)
REFUSED_LINGERING_MAX = 128  # connections refused above MAX_CONNECTIONS that linger at once (``_refuse``)
INVALID_REQUEST = "Invalid HTTP request received."  # what uvicorn logs (and answers) for what httptools refuses
UPGRADE_REFUSED = "A request asked to switch protocols (Upgrade)"  # ``_unsupported_upgrade_warning``
# RFC 9112 3.2's Host: uri-host [ ":" port ], an IP literal or a reg-name (RFC 3986), possibly empty
HOST_VALUE = re.compile(rb"(?:\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
Phase = Literal["headers", "body", "app", "refused"]
RefusalReason = Literal["malformed_http", "too_many_pipelined"]  # what a refusal made here is counted as


class RequestTimeout(HTTPException):
    """Raised inside ``receive`` when the body is overdue: FastAPI's body parsing re-raises an ``HTTPException``
    as it is, and the server's error handler renders it (408, ``"type": "request_timeout"``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s of its headers (REQUEST_TIMEOUT_S); "
                              "send the whole request at once", headers={"Connection": "close"})


class HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a request whose line or headers are over the bounds."""


class TooManyPipelined(Exception):
    """Raised in a parser callback to stop parsing a request pipelined behind ``PIPELINE_MAX`` others."""


class MalformedBody(ServerError):
    """Raised inside ``receive`` when the body being read cannot be parsed (a broken chunked encoding): the
    application answers it as any error raised there (400 ``malformed_http``) and the connection closes."""

    status_code = 400
    error_type = "malformed_http"
    headers = {"Connection": "close"}

    @classmethod
    def of(cls, status: int, message: str, kind: str) -> MalformedBody:
        """One answered with another status and type: a body's trailer fields or chunk-size line over a bound."""
        error = cls(message)
        error.status_code, error.error_type = status, kind
        return error


H2_PREFACE_PAUSE = "Pause on PRI/Upgrade"  # httptools' error at HTTP/2's prior-knowledge preface (``PRI * HTTP/2.0``)


def malformed_message(reason: str) -> str:
    return f"malformed HTTP request ({reason}); send a valid HTTP/1.1 request"


def error_bytes(status: int, message: str, kind: str, retry_after: float | None = None) -> bytes:
    """A whole HTTP/1.1 response in the server's error format, for answers given without the application."""
    body = orjson.dumps({"error": message, "type": kind})
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {max(1, math.ceil(retry_after))}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class RepeatedClientWarnings(logging.Filter):
    """uvicorn logs a WARNING for every request it cannot parse, so a client sending garbage in a loop fills the
    log at the rate it sends; these lines go out at most once a minute each, with how many they stand for (the
    metric ``reason="malformed_http"`` counts every one)."""

    # how the lines start (``UPGRADE_REFUSED``: ``GuardedHttpProtocol._unsupported_upgrade_warning``)
    MESSAGES = (INVALID_REQUEST, UPGRADE_REFUSED)

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle(logging.getLogger(__name__))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        kind = next((m for m in self.MESSAGES if message.startswith(m)), None) if isinstance(message, str) else None
        if kind is None:
            return True
        self._throttle.log(kind, record.levelno, f"uvicorn: {record.msg}")
        return False


CLIENT_WARNINGS = RepeatedClientWarnings()


def client_left(scope: dict) -> bool:
    """Whether the client closed the connection before the request's answer was all written to it (uvicorn then
    drops what the application still sends): ``ObservedASGI`` counts such a request as 499, as nginx logs it and as
    the gRPC API counts a cancelled call, not under the status nobody received. A request a drain gave up on
    (``abandon``: the server wrote its 503) counts so too: at once when it is cancelled so
    (``cancel_when_client_leaves``), else if the application still finishes before the process exits. False
    outside a real connection (tests' in-process clients)."""
    cycle = scope.get(ANSWERING, lambda: None)()
    return cycle is not None and cycle.disconnected and not cycle.response_complete


async def written_out(scope: dict) -> None:
    """Wait until the connection the request came on has taken its answer: nothing, or less than the transport's
    high-water mark, waits unsent in the process (``pause_writing``), or the connection is gone (a client that
    stops reading is cut at ``REQUEST_TIMEOUT_S``). Outside a real connection, at once."""
    flow = scope.get(WRITTEN_OUT, lambda: None)()
    if flow is not None:
        await flow.drain()


def cancel_when_client_leaves(scope: dict) -> None:
    """Have the request's handler cancelled if its client leaves before its answer is written (module docstring):
    for a handler whose work is for its answer alone, so that a client that left costs no more of it. Called by the
    handler from its own task (the request's). Its texts not yet on the engine are dropped (``Batcher.submit``);
    records synced before it left are kept (``server.records``); it is counted 499. A client already gone cancels it
    now. Nothing outside a real connection (tests' in-process clients)."""
    cycle = scope.get(ANSWERING, lambda: None)()
    if cycle is None:
        return
    cycle.scope[CANCEL_ON_LEAVE] = True
    if cycle.disconnected and not cycle.response_complete and not cycle.scope.get(CANCELLED_ON_LEAVE):
        cycle.scope[CANCELLED_ON_LEAVE] = True
        task = asyncio.current_task()
        if task is not None:
            task.cancel()  # raised at its next wait


class HeadWithBody:
    """A response's transport that writes its head (status line and headers) together with the first write of its
    body: one ``send`` and one TCP segment where uvicorn makes two (its ``send`` writes the head on
    ``http.response.start``), so the client wakes once and the loop makes one system call fewer per response
    (cached answers at 64 clients on the development VM, three alternating pairs: 7% more requests per second and
    7% less loop CPU per request; a lone request's wait did not change measurably).

    The first write that is not ``100 Continue`` (written while the client waits to send its body: never held) is
    the head: uvicorn writes nothing else before it. Closing writes a held head first, then ends the connection as
    the protocol says (``close``: lingering when the request's body is still arriving). Everything else is the
    transport's own. A HEAD response, which has no body write, has its head written at once (``hold_head``
    False); it still closes as the protocol says. It suits responses whose body
    follows the head at once, as every one here does; a streaming response would hold its head until its first
    chunk, and a deadline closing the connection meanwhile (which writes to the connection's own transport) would
    drop it.
    """

    __slots__ = ("_transport", "_head", "_head_seen", "_close")

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None] | None = None,
                 hold_head: bool = True) -> None:
        """``close``: how the connection ends after an answer that closes it (default: the transport's close)."""
        self._transport = transport
        self._head: bytes | None = None
        self._head_seen = not hold_head
        self._close = close or transport.close

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        elif self._head_seen or data == CONTINUE:
            self._transport.write(data)
        else:
            self._head_seen = True
            self._head = data

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self._close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class ConnectionGuard:
    """What the connections of one server share: the limits, the open connections, the drain's tally."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.request_timeout_s
        self.max_connections = settings.max_connections
        self.metrics = metrics
        self.open: set[GuardedHttpProtocol] = set()
        self.refused_lingering: set[GuardedHttpProtocol] = set()  # refused above MAX_CONNECTIONS, not yet closed
        self.draining = False
        self.answered = 0  # requests answered since the drain began, the abandoned ones excluded
        self.abandoned = 0  # requests still unanswered when the drain's time ran out (answered 503 here)
        uvicorn_log = logging.getLogger("uvicorn.error")
        if CLIENT_WARNINGS not in uvicorn_log.filters:
            uvicorn_log.addFilter(CLIENT_WARNINGS)

    def protocol_factory(self) -> Callable[..., GuardedHttpProtocol]:
        """What ``uvicorn.Config(http=...)`` calls for each new connection."""
        return functools.partial(GuardedHttpProtocol, guard=self)

    def opened(self, connection: GuardedHttpProtocol) -> None:
        self.open.add(connection)
        self.metrics.open_connections.set(len(self.open))

    def closed(self, connection: GuardedHttpProtocol) -> None:
        self.open.discard(connection)
        self.metrics.open_connections.set(len(self.open))

    def begin_drain(self) -> None:
        """From now on every response closes its connection, so that clients reconnect elsewhere."""
        self.draining = True
        for connection in list(self.open):
            connection.close_after_response()

    def close_idle(self) -> None:
        """Close the keep-alive connections between requests (once the listener is closed).

        A new connection that has not sent its request yet is left open: its client is about to send it, and
        closing now would reset the connection under that request. The request gets its answer (a 503 for
        /predict) or, if it never comes, the connection is closed at the end of the drain.
        """
        for connection in list(self.open):
            if connection.between_requests:
                connection.transport.close()

    def unanswered(self) -> int:
        """Requests received (their headers complete) and not answered yet."""
        return sum(connection.awaiting_answer for connection in self.open)

    def abandon_unanswered(self) -> None:
        """The drain's time is up: answer 503 to every request still unanswered and close every connection."""
        for connection in list(self.open):
            if connection.awaiting_answer:
                self.abandoned += 1
                connection.abandon()
            else:
                connection.transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under the deadlines and the connection bound of a ``ConnectionGuard``."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.phase: Phase = "headers"
        self._application = self.app
        self.app = self._run_application  # what on_headers_complete starts for each request
        self._deadline: asyncio.TimerHandle | None = None
        self._write_stall: asyncio.TimerHandle | None = None  # the client has not read its answers since then
        self._request_begun = False  # a byte of the next request has arrived
        self._in_trailers = False  # the request's headers are parsed: a field now is a chunked body's trailer
        self._responses = 0
        self._failed_body: tuple[dict, Exception] | None = None  # a request whose body failed, and how
        self._not_reading = False  # httptools refused what the client sent, or a refusal lingers: nothing more is read
        self._head_bytes = self._head_fields = 0  # the request line and headers parsed so far (``_count_head``)
        self._unparsed = 0  # bytes given to the parser since it last finished something (``_feed``)
        self._parsed_any = False  # the parser finished something in the piece it is given (``_feed``)
        self._fed_before = 0  # of the data ``_feed`` is giving, the bytes given before the piece being parsed
        # (status, message, type) of a request refused over a bound of the head or of the pipeline, or for its
        # target (``_refuse_target``), and the reason it is counted under
        self._refusal: tuple[int, str, str] | None = None
        self._refusal_reason: RefusalReason = "malformed_http"
        self._upgrade_body_left: int | None = None  # body bytes still due from a request that asked to upgrade
        self._abandoned = False  # answered 503 at the drain's deadline (``abandon``)
        self._refusal_after_answer: bytes | None = None  # a 400 for garbage pipelined behind the request under way
        self._answering: Callable[[], object] = lambda: None  # the cycle of the request being answered (weakly)
        self._answering_task: asyncio.Task | None = None  # the task running it, until it returns
        self._next_when_written = False  # a request waits behind an answer still unsent (``on_response_complete``)

    # connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.guard.open) >= self.guard.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._bound_send_buffer(transport)
        transport.set_write_buffer_limits(high=0)  # writing pauses while any answer waits unsent in the process
        self.guard.opened(self)
        self._await_headers()

    @staticmethod
    def _bound_send_buffer(transport: asyncio.Transport) -> None:
        """Give the connection a kernel send buffer of ``SEND_BUFFER_BYTES``: the kernel grows one by itself up to
        4 MiB (``tcp_wmem``), memory of the server's cgroup that no plan counts, and a client that never reads
        left its answers there, the server taking them as sent (red team helper-86: 300 connections each asking
        for an answer of 1 MB held 311 MB). An answer larger than it waits in the process instead, where its
        request's share of the bodies' budget holds it (``server.http``, ``written_out``)."""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not a TCP socket, or one closed already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, except after a request asking for a protocol this server does not switch to (``Upgrade: h2c``
        as ``curl --http2`` sends it, a WebSocket when none is served). httptools ends such a request at its headers
        and leaves the bytes after them to the new protocol; uvicorn then answered it without its body (a 422 for a
        valid /predict) and never read the request pipelined behind it. Here its body (``Content-Length``) is read
        as the body, and what follows as the next request."""
        if self.phase == "refused" or self._not_reading:
            return
        self._unset_keepalive_if_required()
        data = memoryview(data)  # fed in pieces (``_feed``): slices without copies
        while data and not self._not_reading:
            if self._upgrade_body_left:
                data = self._read_upgrade_body(data)
                continue
            try:
                data = self._feed(data)
                continue
            except httptools.HttpParserError as error:
                if str(error) == H2_PREFACE_PAUSE and self._refusal is None:
                    self._refusal = (400, "HTTP/2 is not spoken on this port (the request began with its preface, "
                                          "'PRI * HTTP/2.0'): send HTTP/1.1 here; gRPC goes to GRPC_PORT",
                                     "malformed_http")
                self.logger.warning(INVALID_REQUEST)
                self.send_400_response(INVALID_REQUEST)
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                    return
                self._unsupported_upgrade_warning()
                data = data[self._fed_before + upgrade.args[0]:]  # the parser resumes at the next request

    def _unsupported_upgrade_warning(self) -> None:
        """One line for a request asking to upgrade (throttled: ``RepeatedClientWarnings``). uvicorn's advised
        installing a WebSocket library, for a server that serves no WebSocket at all (red team helper-86)."""
        self.logger.warning(f"{UPGRADE_REFUSED}; this server speaks HTTP/1.1 (and gRPC on GRPC_PORT) and serves no "
                            "WebSocket or h2c: answered as HTTP/1.1")

    def _feed(self, data: memoryview) -> memoryview:
        """Give the parser ``data`` a piece of at most ``UNPARSED_MAX_BYTES`` at a time; returns what is left when
        it stops reading. Past ``UNPARSED_MAX_BYTES`` given with nothing parsed (no field, chunk or body piece
        finished), the request is refused (``_refuse_unending``): httptools keeps a header field, or skips a chunk's
        size line and a trailer, until it ends, and nothing is told before then. One header value sent without end
        grew the process by 145 MiB and held the event loop for 3.5 s (httptools joins its pieces by copying the
        whole at each piece), and a chunk size with an endless extension or leading zeros took 17 GB in 30 s,
        counted against no bound (red team helper-86)."""
        self._fed_before = 0
        while data and not self._not_reading:
            piece = data[:UNPARSED_MAX_BYTES]
            self._parsed_any = False
            self.parser.feed_data(piece)
            self._fed_before += len(piece)
            data = data[len(piece):]
            self._unparsed = 0 if self._parsed_any else self._unparsed + len(piece)
            if self._unparsed > UNPARSED_MAX_BYTES:
                self._refuse_unending()
        return data

    def _refuse_unending(self) -> None:
        """Refuse a request whose header field, trailer field or chunk-size line runs past ``UNPARSED_MAX_BYTES``
        (``_feed``), as the parser's own refusals are (``send_400_response``); nothing more is read."""
        if not self._in_trailers:  # a request's head (the next one's, pipelined, while one is answered)
            self._refusal = (431, f"a header field of more than {UNPARSED_MAX_BYTES // 1024} KiB took the request "
                                  f"past this server's limit ({HEAD_MAX_BYTES // 1024} KiB for the request line and "
                                  "headers together); send shorter headers", "head_too_large")
        else:
            self._refusal = (400, f"a chunk-size line or a trailer field of more than {UNPARSED_MAX_BYTES // 1024} "
                                  "KiB; send the body in plain chunks (no extensions, no padding) or with "
                                  "Content-Length, and short trailers", "malformed_http")
        self.send_400_response(INVALID_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._cancel_write_stall()
        if self.phase != "refused":
            self.guard.closed(self)
        else:
            self.guard.refused_lingering.discard(self)
        # uvicorn marks only the last request parsed as disconnected; with requests pipelined behind it, the one
        # being answered is an earlier one, which would write to the closed transport and be counted as answered
        answering = self._answering()
        if answering is not None and not answering.response_complete:
            answering.disconnected = True
            answering.message_event.set()
            self._cancel_on_leave(answering)
        super().connection_lost(exc)
        self._drop_unread_bodies(answering)

    def _cancel_on_leave(self, cycle) -> None:
        """The client left while ``cycle`` was answered: cancel its handler if it asked (``cancel_when_client_leaves``),
        at once, rather than compute an answer no one will read (module docstring)."""
        task = self._answering_task
        scope = cycle.scope
        if task is None or task.done() or not scope.get(CANCEL_ON_LEAVE) or scope.get(CANCELLED_ON_LEAVE):
            return
        scope[CANCELLED_ON_LEAVE] = True
        task.cancel()

    def _drop_unread_bodies(self, answering: object) -> None:
        """Drop the body bytes received but never read: the answer came first (a 404, a 401, a 415), and after the
        connection is lost ``receive`` only says ``http.disconnect``. The request cycles and this protocol hold each
        other, so the bytes waited for the cyclic garbage collector, which the server runs seldom
        (``server.heap``): 1,000 connections each closed after a 900 KB body got a 404 held ~45 MB."""
        for cycle in {id(c): c for c in (self.cycle, answering, *(c for c, _ in self.pipeline)) if c}.values():
            cycle.body = bytearray()

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client is not reading its answers. Past ``REQUEST_TIMEOUT_S`` of
        that the connection is aborted: a client pipelining requests and never reading held its connection (and its
        place under ``MAX_CONNECTIONS``) forever, its answers waiting to be written."""
        super().pause_writing()
        if self._write_stall is None:
            self._write_stall = self.loop.call_later(self.guard.body_timeout_s, self._reader_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_stall()
        if self._next_when_written:
            self._next_when_written = False
            self.on_response_complete()

    def _cancel_write_stall(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _reader_stalled(self) -> None:
        self._write_stall = None
        self.guard.metrics.rejected.labels("slow_client").inc()
        self.transport.abort()  # its buffered answers are dropped: the client is counted 499 (``client_left``)

    # parser and response events

    def on_message_begin(self) -> None:
        self._parsed_any = True
        if len(self.pipeline) >= PIPELINE_MAX:
            self._stop_pipelining()
        super().on_message_begin()
        self._request_begun = True
        self._in_trailers = False
        self._head_bytes = self._head_fields = 0

    def _stop_pipelining(self) -> None:
        """Refuse a request pipelined behind ``PIPELINE_MAX`` others, once they are answered, and read nothing more.

        uvicorn parses every request of what it reads and queues them; after each answer it read on, whatever was
        still queued: one client pipelining ``GET /ready`` grew the server by 100 MB/s (~2 KB a queued request)
        and held other clients' /ready up to 2 s (red team helper-63). Besides this bound, reading stays paused
        while requests are queued (``on_response_complete``), so what one connection holds unanswered is at most
        one read of its socket. RFC 9112 (9.3.2) lets a server close a connection with pipelined requests
        unanswered: the client sends them again."""
        self._refusal = (429, f"more than {PIPELINE_MAX} requests pipelined on one connection behind the one being "
                              "answered; the requests from this one on were not read: wait for answers before "
                              "sending more, or open another connection", "too_many_pipelined")
        self._refusal_reason = "too_many_pipelined"
        raise TooManyPipelined()

    def on_url(self, url: bytes) -> None:
        self._parsed_any = True
        self._count_head(len(url), 0, 414, "the request URL")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header field; a trailer field (after a chunked body) is dropped. uvicorn added trailers to the request's
        headers, which the app reads once the body is in: an API key or a Content-Type sent in a trailer was taken
        as if sent in the head (red team helper-65; RFC 9110 6.5.1: a trailer is not to be merged into the header
        section), where proxies that check or replace keys do not look. Trailer fields are bounded as header
        fields are (they were not: 500 trailer fields of 1 KB were read)."""
        self._parsed_any = True
        if self._in_trailers:
            self._count_head(len(name) + len(value), 1, 431, "the trailer fields")
            return
        self._count_head(len(name) + len(value), 1, 431, "the request headers")
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        self._parsed_any = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._parsed_any = True

    def on_chunk_complete(self) -> None:
        self._parsed_any = True

    def _count_head(self, size: int, fields: int, status: int, what: str) -> None:
        """Bound a request's line and headers (``HEAD_MAX_BYTES``, ``HEAD_MAX_FIELDS``): uvicorn keeps them all,
        so one connection sending headers for its whole header deadline grew the process by gigabytes, and a URL
        arriving in pieces is copied whole at each piece (seconds of the event loop for a URL of 80 MB). Past
        either bound the parser stops (``send_400_response`` answers ``_refusal``) and nothing more is read."""
        self._head_bytes += size
        self._head_fields += fields
        if self._head_bytes > HEAD_MAX_BYTES or self._head_fields > HEAD_MAX_FIELDS:
            self._refusal = (status, f"{what} took the request past this server's limit ({HEAD_MAX_BYTES // 1024} "
                                     f"KiB for the request line and headers together, {HEAD_MAX_FIELDS} header "
                                     "fields; the same for a chunked body's trailer fields); send a shorter URL or "
                                     "fewer headers", "head_too_large")
            raise HeadTooLarge(what)

    def on_headers_complete(self) -> None:
        self._parsed_any = True
        self._refuse_version_or_host()
        try:
            super().on_headers_complete()
        except httptools.HttpParserInvalidURLError:
            self._refuse_target()
        self._in_trailers = True
        self._head_bytes = self._head_fields = 0  # trailer fields count from here (``on_header``)
        self._request_begun = False  # until the next request's first byte, which may come before this one's answer
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # else uvicorn took it as an upgrade: no cycle of its own
            cycle.scope[ANSWERING] = weakref.ref(cycle)  # weak: the cycle holds the scope (``client_left``)
            cycle.scope[WRITTEN_OUT] = weakref.ref(self.flow)  # weak, as the cycle's: the flow leads to the scope
            cycle.transport = HeadWithBody(self.transport, self._close_answered,
                                           hold_head=cycle.scope["method"] != "HEAD")  # HEAD: no body write
        if self.guard.draining:
            self.cycle.keep_alive = False
        self.phase = "body"
        self._arm(self.guard.body_timeout_s, self._body_overdue)

    def _refuse_version_or_host(self) -> None:
        """A request line saying HTTP/2.0 (httptools takes it as 1.x: it was answered as HTTP/1.1) or 0.9, or a Host
        that RFC 9112 (3.2) says a server MUST refuse with 400: more than one, one that is not a host[:port], or none
        in HTTP/1.1. A proxy before this server may have routed or checked the request by another Host than the one
        read here (red team helper-100: answered 200; review helper-101: a proxy that merges two Host fields makes
        ``a, b``)."""
        version = self.parser.get_http_version()
        hosts = [value for name, value in self.headers if name == b"host"]
        if version not in ("1.1", "1.0"):
            message = f"HTTP/{version} is not spoken on this port: send HTTP/1.1"
        elif len(hosts) > 1 or (version == "1.1" and not hosts):
            message = (f"the request carries {len(hosts)} Host header fields; send exactly one (RFC 9112 3.2: "
                       "HTTP/1.1 requires one)")
        elif hosts and not HOST_VALUE.fullmatch(hosts[0]):
            message = f"Host {hosts[0][:100].decode('latin-1')!r} is not a host[:port] (RFC 9112 3.2)"
        else:
            return
        self._refusal = (400, message, "malformed_http")
        raise httptools.HttpParserError(message)

    def _refuse_target(self) -> None:
        """A request target that is neither a path nor an absolute http URL (``CONNECT host:port``, a port out of
        range): the parser's error says only "User callback error" (red team helper-86)."""
        target = self.url[:100].decode("latin-1")
        if self.parser.get_method() == b"CONNECT":
            message = (f"CONNECT {target!r} asks for a tunnel, which proxies make; this server is not a proxy: send "
                       "your requests to it directly (POST /predict)")
        else:
            message = f"the request target {target!r} is not a path: send one such as /predict (or http://host/predict)"
        self._refusal = (400, message, "malformed_http")
        raise httptools.HttpParserError(message)

    def on_message_complete(self) -> None:
        self._parsed_any = True
        if self.parser.should_upgrade() and not self._should_upgrade() and self._upgrade_body_left is None:
            # httptools' end of a request asking to upgrade comes at its headers (``data_received``)
            self._upgrade_body_left = self._declared_body_length()
            if self._upgrade_body_left:
                return  # read by ``data_received``, then completed (``_read_upgrade_body``)
        self._upgrade_body_left = None
        self._message_complete()

    def _message_complete(self) -> None:
        super().on_message_complete()
        if self.phase != "body":
            return
        if self.cycle.response_complete:  # answered before its body had all arrived: idle from now
            self._await_headers()
        else:
            self.phase = "app"
            self._cancel_deadline()
            if not self.pipeline and not self._not_reading:
                # read on while it is answered, so that a client leaving is seen (module docstring); what arrives
                # meanwhile is the next request, pipelined, which stops reading again (uvicorn's on_headers_complete)
                self.flow.resume_reading()

    def _declared_body_length(self) -> int:
        """The ``Content-Length`` of the request whose headers were just parsed (0 without one); a chunked body,
        which only the parser could frame, fails the request with 400 and nothing more is read."""
        length = 0
        for name, value in self.headers:
            if name == b"transfer-encoding":
                self._not_reading = True
                self._fail_body(MalformedBody(
                    "a request asking to upgrade the protocol (Upgrade header) cannot send a chunked body: no "
                    "protocol is switched to here; send the body with Content-Length, or drop the Upgrade header"))
                return 0
            if name == b"content-length":
                length = int(value)  # the parser has refused any other spelling
        return length

    def _read_upgrade_body(self, data: bytes) -> bytes:
        """Give the body of a request that asked to upgrade its share of ``data``; the rest is returned."""
        body, rest = data[:self._upgrade_body_left], data[self._upgrade_body_left:]
        self._upgrade_body_left -= len(body)
        self.on_body(body)
        if not self._upgrade_body_left:
            self._upgrade_body_left = None
            self._message_complete()
        return rest

    def on_response_complete(self) -> None:
        if self.pipeline and self.flow.write_paused and not self.transport.is_closing():
            # The answer waits unsent (its client is not reading): the request pipelined behind it starts once the
            # answer is written out (``resume_writing``). uvicorn started it at once, and its answer then waited
            # unsent as well, and the next one's: 1,000 connections pipelining 8 ``GET /openapi.json`` (54 KB) and
            # never reading held 242 MB in the process; one unsent answer per connection is the most now.
            self._next_when_written = True
            return
        self._responses += 1
        if self.guard.draining:
            self.guard.answered += 1
        refusing = self._refusal_after_answer is not None and not self.pipeline  # after the requests before it
        if refusing:
            self._refuse_malformed(self._refusal_after_answer)
        super().on_response_complete()  # starts the next request queued, if any, and reads on
        if self.pipeline:  # more are queued behind the one it started: nothing more is read until they are answered
            self.flow.pause_reading()
        if self.timeout_keep_alive_task is None:  # the connection is closing, or a pipelined request started
            return
        self._unset_keepalive_if_required()  # uvicorn's keep-alive timer: the header deadline replaces it
        if refusing:  # the refusal's linger closes the connection: a header deadline armed here replaced that
            return  # timer, and what the client sent was read and discarded for HEADER_TIMEOUT_S (780 MB in 6 s)
        if self.phase == "app":
            self._await_headers()
        # phase "body": answered before its body had all arrived; the body deadline still runs

    async def _run_application(self, scope, receive, send) -> None:
        self._answering = scope[ANSWERING]  # pipelined requests are answered one at a time, in order
        task = self._answering_task = asyncio.current_task()

        async def receive_in_time():
            message = await receive()
            if self._failed_body is not None and scope is self._failed_body[0]:
                raise self._failed_body[1]
            return message

        try:
            await self._application(scope, receive_in_time, send)
        except asyncio.CancelledError:
            if scope.get(CANCELLED_ON_LEAVE):  # its client left (``_cancel_on_leave``): counted 499, nothing to log
                return
            if not self._abandoned:
                raise
            # Answered 503 at the drain's deadline (``abandon``); the loop closing cancels what the application
            # still awaited (a model reload under way): uvicorn logged that as an ERROR with a traceback.
        finally:
            if self._answering_task is task:
                self._answering_task = None  # the task holds this protocol: no cycle left for the collector

    # drain

    @property
    def between_requests(self) -> bool:
        return self.phase == "headers" and not self._request_begun and self._responses > 0

    @property
    def awaiting_answer(self) -> bool:
        return self.phase in ("body", "app") and not self.cycle.response_complete

    def close_after_response(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def abandon(self) -> None:
        """Answer 503 here, in place of the application (its own answer, if one ever comes, is dropped), and close.

        Only at the end of a drain: the process is about to exit, so how the application counts the request it
        can no longer answer matters to no one. A request that asked to be cancelled when its client leaves is
        cancelled here too (``connection_lost``), as the batcher's drain fails what it still holds.
        """
        cycle = self.cycle
        self._abandoned = True
        if not cycle.response_started:
            cycle.disconnected = True  # cycle.send() now drops the application's answer
            cycle.message_event.set()  # and a receive() it waits in returns http.disconnect
            self.transport.write(error_bytes(503, "the server shut down before this request was answered "
                                                  "(DRAIN_TIMEOUT_S); retry on another replica", "draining",
                                             retry_after=1))
        self.transport.close()  # a response under way is cut: nothing better can be done with it

    # deadlines

    def _await_headers(self) -> None:
        self.phase = "headers"
        self._arm(self.guard.header_timeout_s, self._headers_overdue)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_overdue(self) -> None:
        self._deadline = None
        if self._request_begun or not self._responses:
            self.guard.metrics.rejected.labels("slow_client").inc()
        if self._request_begun:
            if self.guard.draining:
                self.guard.answered += 1
            self._close_lingering(error_bytes(408, f"request headers not received within "
                                                   f"{self.guard.header_timeout_s:g} s (HEADER_TIMEOUT_S); send the "
                                                   "whole request at once", "request_timeout"))
        else:
            self.transport.close()

    def _body_overdue(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle.response_started:  # answered already: stop waiting for the rest of the body
            self.transport.close()
            return
        self.guard.metrics.rejected.labels("slow_client").inc()
        self._fail_body(RequestTimeout(self.guard.body_timeout_s))

    def _fail_body(self, error: Exception) -> None:
        """The application's next (or current) wait for the body raises ``error``; it answers, then the connection
        closes."""
        cycle = self.cycle
        self._failed_body = (cycle.scope, error)
        cycle.keep_alive = False  # whatever the application answers, the connection closes after it
        cycle.message_event.set()  # wakes a receive() it waits in: receive_in_time raises the error

    # what httptools cannot parse

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer (plain text) to what httptools cannot parse, called where it catches the parser's
        error: the answer in the server's error format instead, when it is due (module docstring)."""
        self._not_reading = True
        error = sys.exc_info()[1]  # the HttpParserError being handled: its reason is more use than uvicorn's msg
        message = malformed_message(str(error) if error is not None and str(error) else "unparseable")
        refusal = error_bytes(*self._refusal) if self._refusal else error_bytes(400, message, "malformed_http")
        cycle = self.cycle
        if cycle is None or cycle.response_complete and self.phase != "body":
            self._refuse_malformed(refusal)
        elif self.phase == "body" and not cycle.response_started:
            self._fail_body(MalformedBody(message) if self._refusal is None else MalformedBody.of(*self._refusal))
        elif self.phase == "body":  # answered already: the rest of its body is what broke; nothing to answer
            if cycle.response_complete:
                self.transport.close()
            else:
                cycle.keep_alive = False
        else:  # garbage pipelined behind the request being answered: refused once that answer is sent
            self._refusal_after_answer = refusal

    def _refuse_malformed(self, response: bytes) -> None:
        self._refusal_after_answer = None
        self.guard.metrics.rejected.labels(self._refusal_reason).inc()
        if self.transport.is_closing():  # the answer before it closed the connection (Connection: close)
            return
        if self.guard.draining:
            self.guard.answered += 1
        self._close_lingering(response)

    def _close_answered(self) -> None:
        """The close after an answer that ends its connection. One given before its request's body had all arrived
        (``server.http.ObservedASGI`` closes those: a refusal on the headers, a 404, a 401) lingers as a refusal
        does: closed at once, the body still arriving reset the connection, and a client that writes its body before
        reading lost the answer (red team helper-80: an 8 MB body to a 415, a reset in 10 tries of 10). Only the
        newest request's body can still be arriving, and its answer is then the one complete: a request pipelined
        behind the answered one is never started (red team helper-81: lingering there, it ran unanswered)."""
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._linger()
            return
        self.transport.close()

    def _close_lingering(self, response: bytes) -> None:
        """Write ``response``, then close lingering (``_linger``)."""
        self.transport.write(response)
        self._linger()

    def _linger(self) -> None:
        """Half-close, then close after ``REFUSAL_LINGER_S`` of reading and discarding what the client still sends
        (``data_received``): closing with its bytes unread resets the connection, and the client can lose the
        answer (a client trickling its headers had sent one more byte as its 408 went out)."""
        self._not_reading = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(REFUSAL_LINGER_S, self.transport.close)

    # refusal above MAX_CONNECTIONS

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 and close, lingering (``_linger``) while at most ``REFUSED_LINGERING_MAX`` others do. Every
        lingering connection holds a file descriptor beside the ``MAX_CONNECTIONS`` open ones: a flood of new
        connections (1,000 a second, never sending) used up the process's files, and /health, /metrics and the
        spool failed with EMFILE (red team helper-86). Past the bound the 503 is written and the connection closed
        at once (a client still sending may then see a reset instead of its 503)."""
        self.phase = "refused"
        self.transport = transport
        self.guard.metrics.rejected.labels("too_many_connections").inc()
        refusal = error_bytes(503, f"the server has {self.guard.max_connections} connections open (MAX_CONNECTIONS); "
                                   "retry after the Retry-After delay", "too_many_connections", retry_after=1)
        if len(self.guard.refused_lingering) >= REFUSED_LINGERING_MAX:
            transport.write(refusal)
            transport.close()
            return
        self.guard.refused_lingering.add(self)
        self._close_lingering(refusal)
