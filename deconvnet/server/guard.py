"""Connection policy of ``deconvnet serve``: slow or idle clients cannot starve real ones.

What uvicorn and Starlette offer is used as they offer it (``commands/interfaces.py``): uvicorn's
``limit_concurrency`` caps open connections (``--max-connections``; a request over the cap is answered
503), ``timeout_keep_alive`` closes idle kept-alive connections, ``h11_max_incomplete_event_size``
bounds a request head's size; Starlette's multipart limits (files, fields, a field's size) bound an
upload's form where it is parsed (``server/images.py``). Here is only what they lack, on public APIs:

* ``ConnectionGuard``: a deadline for each request head (a client that opens a connection and sends
  its headers a byte at a time is answered 408 and dropped after ``header_timeout`` seconds: uvicorn has
  no such deadline) and a lingering close (a refused body still being sent is read and dropped, so the
  client gets the 413). ``ConnectionGuard.protocol()`` is an ``asyncio.Protocol`` (pass it as
  ``uvicorn.Config(http=...)``) that holds uvicorn's own h11 protocol and passes everything through to
  it; ``ConnectionGuard.asgi(app)`` is the ASGI middleware that tells it when a request starts (its head
  is in) and when its response is complete (the next head's deadline starts).
* ``RequestLimits``: ASGI middleware: at most ``max_in_flight`` requests in progress (more get 503
  with Retry-After at once instead of queueing without bound) and a deadline for reading a request
  body (408 after ``body_timeout`` seconds), so a slow upload holds no worker for long.
* ``OriginGuard``: ASGI middleware: only the server's own names are answered (a ``Host`` header of
  another name is refused 403, which defeats DNS rebinding) and a request a browser sends on behalf of
  another site is refused 403: a state-changing one whose ``Origin`` (or ``Referer``) is foreign, and
  any request the browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` other than following
  a link to a page. Every answer carries ``Cross-Origin-Resource-Policy: same-origin`` (other sites
  cannot embed its images) and ``X-Frame-Options: DENY`` (nor frame the page). See
  docs/reliability.md for the threat model.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

__all__ = ["ConnectionGuard", "OriginGuard", "RequestLimits", "TrackingSend", "LOOPBACK_NAMES", "served_names"]

_TIMEOUT_BODY = b'{"error": "request headers not received in time; send them at once", "status": 408}'
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)
HEAD_END = b"\r\n\r\n"


class _LingeringTransport:
    """A transport whose ``close`` first half-closes (FIN after the pending response) and keeps
    reading and discarding for up to ``linger`` seconds, like web servers' "lingering close": a
    client still sending a body the server refused (413) then reads the answer instead of a
    connection reset caused by unread data."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop, linger: float = 2.0) -> None:
        self._transport, self._loop, self._linger = transport, loop, linger
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        try:
            if self._transport.can_write_eof():
                self._transport.write_eof()  # sent once the response is flushed
                self._transport.resume_reading()
                self._loop.call_later(self._linger, self._transport.close)
                return
        except (OSError, RuntimeError):
            pass
        self._transport.close()


def _peer(address: Any) -> tuple[str, int] | None:
    """A connection's key as ASGI's ``scope["client"]`` spells it: (host, port)."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class _Connection(asyncio.Protocol):
    """One client connection: uvicorn's h11 protocol inside, with the request-head deadline around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.loop = asyncio.get_running_loop()
        self.transport: _LingeringTransport | None = None
        self.key: tuple[str, int] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.busy = False  # a request's head is in and its response not yet complete
        self.tail = b""  # the last bytes received, to find a head's end split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _LingeringTransport(transport, self.loop)
        self.key = _peer(transport.get_extra_info("peername"))
        if self.key is not None:
            self.guard.connections[self.key] = self
        # a duck-typed proxy: as a subclass of asyncio.Transport, the base's methods would hide the
        # transport's own (they are reached through __getattr__)
        self.inner.connection_made(cast(asyncio.Transport, self.transport))
        self.arm()

    def arm(self) -> None:
        """Start the next request head's deadline (a new connection, or a response complete)."""
        self.disarm()
        self.busy, self.tail = False, b""
        self.deadline = self.loop.call_later(self.guard.header_timeout, self.timed_out)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def timed_out(self) -> None:
        self.deadline = None
        if not self.busy and self.transport is not None and not self.transport.is_closing():
            # still waiting for (the rest of) a request head: answer 408 and drop the connection
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport is not None and self.transport.lingering:
            return  # closing: what the client still sends is read and dropped
        if self.deadline is not None:
            seen = self.tail + data
            if HEAD_END in seen:
                self.disarm()  # the head is complete: the body has its own deadline (RequestLimits)
            self.tail = seen[-(len(HEAD_END) - 1) :]
        cast(Any, self.inner).data_received(data)

    def eof_received(self) -> bool | None:
        return cast(Any, self.inner).eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.key is not None and self.guard.connections.get(self.key) is self:
            del self.guard.connections[self.key]
        self.inner.connection_lost(exc)


class ConnectionGuard:
    """The request-head deadline and lingering close of one server (see the module docstring).

    ``protocol()`` is the class to pass as ``uvicorn.Config(http=...)`` and ``asgi(app)`` the app to
    serve: both must be used, the middleware marking each connection busy while a request is served
    (found by ``scope["client"]``, so run uvicorn with ``proxy_headers=False``)."""

    def __init__(self, header_timeout: float = 10.0) -> None:
        self.header_timeout = header_timeout
        self.connections: dict[tuple[str, int], _Connection] = {}

    def protocol(self) -> type[asyncio.Protocol]:
        """An ``asyncio.Protocol`` class for ``uvicorn.Config(http=...)``: uvicorn constructs it with the
        arguments of its own protocols, which go unchanged to the h11 protocol it wraps."""
        from uvicorn.protocols.http.h11_impl import H11Protocol

        guard = self

        class GuardedConnection(_Connection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(guard, H11Protocol(*args, **kwargs))

        return GuardedConnection

    def asgi(self, app: Any) -> Callable[..., Any]:
        """``app`` with each HTTP request marked on its connection: busy from its start (no 408 can be
        written into it), the next head's deadline from its response's last byte."""
        connections = self.connections

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            connection = connections.get(_peer(scope.get("client"))) if scope["type"] == "http" else None  # type: ignore[arg-type]
            if connection is None:
                await app(scope, receive, send)
                return
            connection.disarm()
            connection.busy = True

            async def marking_send(message: dict) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    connection.arm()

            await app(scope, receive, marking_send)

        return guarded


class _BodyTimeout(StarletteHTTPException):
    """An HTTPException so that the framework's body parsing passes it through unchanged."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"request body not received within {seconds:g} s; send it at once (or use a faster connection)"
        )


class TrackingSend:
    """An ASGI ``send`` that notes whether the response has started: a middleware that catches an
    error raised by the app may answer it itself only while nothing has been sent."""

    def __init__(self, send: Callable) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class RequestLimits:
    """ASGI middleware: a cap on requests in progress and a deadline for reading each body."""

    def __init__(self, app: Any, max_in_flight: int = 64, body_timeout: float = 60.0) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.body_timeout = body_timeout
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await _answer(
                send, 503, f"server busy: {self.in_flight} requests in progress; try again in a moment", retry_after=1
            )
            return
        self.in_flight += 1
        deadline = time.monotonic() + self.body_timeout
        body_done = False
        tracking_send = TrackingSend(send)

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:
                return await receive()  # after the body: waiting for a disconnect is not reading
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _BodyTimeout(self.body_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _BodyTimeout as e:
            if not tracking_send.started:
                await _answer(send, 408, str(e.detail), close=True)
        finally:
            self.in_flight -= 1


async def _answer(
    send: Callable, status: int, message: str, retry_after: int | None = None, close: bool = False
) -> None:
    import json

    body = json.dumps({"error": message, "status": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- body size limit


class _TooLarge(StarletteHTTPException):
    """Raised while the body is read; an HTTPException so that the framework's body parsing passes it
    through unchanged (it turns other exceptions into 400) and the JSON error handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (over {limit:,} bytes)")


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, whether announced by
    Content-Length or streamed (chunked), before they are parsed or spooled. Starlette's form limits
    do not bound a file's size; its ``RequestBodyLimitMiddleware`` (FastAPI's ``max_body_size``) does,
    but answers a plain "Content Too Large" without the limit, and only once the body is read: this one
    refuses an announced oversized body at once, in the API's JSON, naming the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await self._refuse(send, declared)
                    return
        received = 0
        tracking_send = TrackingSend(send)

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(self.limit)
            return message

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not tracking_send.started:
                await self._refuse(send, received)

    async def _refuse(self, send: Callable, size: int) -> None:
        what = (
            "invalid Content-Length"
            if size < 0
            else f"request body too large ({size:,} bytes; the limit is {self.limit:,})"
        )
        body = JSONResponse({"error": what, "status": 413}, status_code=413).body
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- Host and Origin

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def served_names(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The host names a server listening on ``host`` answers to: the loopback names, ``host`` itself
    and ``extra``; on a wildcard address (0.0.0.0, ::) also this machine's host name."""
    names = [*LOOPBACK_NAMES, host.strip("[]").lower(), *(n.strip("[]").lower() for n in extra)]
    if host in WILDCARD_HOSTS:
        names += [socket.gethostname().lower(), socket.getfqdn().lower()]
    return list(dict.fromkeys(n for n in names if n and n not in WILDCARD_HOSTS))


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name, port or None); None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
    else:
        name, _, port_text = value.partition(":") if value.count(":") <= 1 else (value, "", "")
    if not name:
        return None
    if not port_text:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


class OriginGuard:
    """ASGI middleware: requests for another host name and cross-site requests refused (403).

    ``names``: the host names served (see ``served_names``); ``port``: the port listened on
    (``None``: any port of those names, for an app mounted by other means). A request without
    ``Origin``, ``Referer`` and ``Sec-Fetch-Site`` (curl, scripts) is not a browser acting for
    another site and is served when its ``Host`` is one of ours."""

    def __init__(self, app: Any, names: Iterable[str] = LOOPBACK_NAMES, port: int | None = None) -> None:
        self.app = app
        self.names = frozenset(n.strip("[]").lower() for n in names)
        self.port = port

    def ours(self, name: str, port: int | None, scheme: str = "http") -> bool:
        """Whether ``name:port`` (the port missing: the scheme's default) is this server."""
        if name.strip("[]") not in self.names:
            return False
        if self.port is None:
            return True
        return (port if port is not None else {"http": 80, "https": 443}.get(scheme)) == self.port

    def refusal(self, scope: dict) -> tuple[int, str] | None:
        """(status, why) for a request to refuse, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is None:
            return 400, "a Host header is required"
        parsed = split_host(host)
        if parsed is None:
            return 400, "malformed Host header"
        if not self.ours(*parsed):
            return 403, (
                f"this server does not answer to host {host!r}: open it as http://127.0.0.1:PORT/ "
                "(deconvnet serve --allow-host NAME adds a name)"
            )
        site = headers.get("sec-fetch-site")
        navigating = headers.get("sec-fetch-mode") == "navigate" and scope.get("method") == "GET"
        if site in ("cross-site", "same-site") and not navigating:
            return 403, "cross-site request refused: the explorer answers only its own page"
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        source = origin if origin is not None else headers.get("referer")
        if source is None:
            return None
        url = urlsplit(source)
        try:
            port = url.port
        except ValueError:
            port = -1
        web = url.scheme in ("http", "https")
        if source == "null" or not web or not self.ours(url.hostname or "", port, url.scheme):
            what = "Origin" if origin is not None else "Referer"
            return 403, f"cross-origin request refused ({what} {source!r}): the explorer answers only its own page"
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_policy(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await _answer(with_policy, *refused)
            return
        await self.app(scope, receive, with_policy)
