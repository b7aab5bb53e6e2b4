"""A lean HTTP/1.1 load generator for the benchmarks: keep-alive connections driven by
asyncio protocols, requests written as prepared bytes, answers read by Content-Length.

Why not aiohttp: the load generator shares the machine's two cores with the server, and
aiohttp's client spent 0.40-0.45 ms of CPU per request (its request building, header
handling and response objects), so at 1 000 checks/s it took almost half a core from the
server it was measuring. This client spends a few tens of microseconds per request. It
speaks only what the benchmarks need: POST with a JSON body to one host, answers with a
Content-Length (Django always sends one for these endpoints), no chunked bodies, no TLS.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class HttpError(Exception):
    """The connection broke or the answer could not be read."""


# A connection idle longer than this is closed rather than reused (under the server's
# keep-alive timeout).
REUSE_IDLE_SECONDS = 1.0


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.closing = False  # the server said "Connection: close"
        self.idle_since = 0.0  # loop time it last went idle
        self._need: int | None = None  # bytes of a complete answer, once the head is read
        self._status = 0
        self._head_end = 0

    def connection_made(self, transport):
        self.transport = transport
        self.idle_since = asyncio.get_running_loop().time()

    def stale(self) -> bool:
        """Closed, or idle so long that the server may be closing it as we reuse it: a
        request written as the server's keep-alive timeout fires (gunicorn: 2 s) is lost
        with the connection. HTTP clients drop such connections; so does this one."""
        if not self.closed and asyncio.get_running_loop().time() - self.idle_since > REUSE_IDLE_SECONDS:
            self.transport.close()
            self.closed = True
        return self.closed

    def connection_lost(self, exc):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes):
        self.buffer += data
        if self._need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            try:
                self._status = int(head[0].split(" ", 2)[1])
                length = next(int(line.split(":", 1)[1]) for line in head[1:]
                              if line[:15].lower() == "content-length:")
                # A server that closes after each answer (gunicorn's sync workers): the
                # connection must not go back to the pool, or the next request is lost.
                self.closing = any(line.lower().replace(" ", "") == "connection:close" for line in head[1:])
            except (IndexError, ValueError, StopIteration):
                self._fail(HttpError(f"unreadable answer head: {head[:1]}"))
                return
            self._head_end = end + 4
            self._need = self._head_end + length
        if len(self.buffer) >= self._need:
            body = bytes(self.buffer[self._head_end:self._need])
            del self.buffer[:self._need]
            self._need = None
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((self._status, body))

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def _write(self, request: bytes, timeout: float) -> asyncio.Future:
        """Write one request: the future gets (status, body), or the error (none within
        `timeout`, connection lost)."""
        if self.closed:
            raise HttpError("connection closed")
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, self._fail, HttpError(f"no answer within {timeout:.0f} s"))
        waiter.add_done_callback(lambda _: timer.cancel())
        self.transport.write(request)
        return waiter

    def start(self, request: bytes, timeout: float, on_done) -> None:
        """Write one request; `on_done(status, body)` or `on_done(None, error)` is called
        once, from the event loop (callbacks, not a task per request: cheaper)."""
        try:
            waiter = self._write(request, timeout)
        except HttpError as error:
            on_done(None, error)
            return

        def done(future: asyncio.Future) -> None:
            error = future.exception()
            if error is not None:
                on_done(None, error)
            else:
                on_done(*future.result())

        waiter.add_done_callback(done)

    async def send(self, request: bytes, timeout: float) -> tuple[int, bytes]:
        return await self._write(request, timeout)


class Client:
    """Prepared POSTs to one server, over a pool of keep-alive connections."""

    def __init__(self, base: str, api_key: str):
        host_port = base.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.head = (f"Host: {host_port}\r\nAuthorization: Bearer {api_key}\r\n"
                     "Content-Type: application/json\r\nAccept: */*\r\n").encode()
        self.idle: list[Connection] = []
        self.opened = 0

    def request(self, path: str, body: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\n".encode() + self.head
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async def connection(self) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.stale():
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        self.opened += 1
        return conn

    async def post(self, request: bytes, timeout: float) -> tuple[int, bytes]:
        """Send one prepared request on an idle (or new) connection; the connection goes
        back to the pool only after a complete answer."""
        conn = await self.connection()
        try:
            answer = await conn.send(request, timeout)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        if conn.closing:
            conn.transport.close()
        else:
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


async def closed_loop(client: Client, *, path: str, concurrency: int, seconds: float, max_requests: int,
                      timeout: float, make_body, on_answer, on_error) -> float:
    """`concurrency` senders each send a request, wait for the answer, repeat, until
    `seconds` have passed or `max_requests` have been sent. `make_body(worker, seq)`
    returns the JSON body as bytes; `on_answer(status, body, latency_s)`,
    `on_error(message)`. Returns the elapsed wall time."""
    counter = iter(range(max_requests))
    start = time.perf_counter()
    deadline = start + seconds

    async def sender(worker: int) -> None:
        while time.perf_counter() < deadline:
            seq = next(counter, None)
            if seq is None:
                return
            request = client.request(path, make_body(worker, seq))
            sent = time.perf_counter()
            try:
                status, body = await client.post(request, timeout)
            except (HttpError, OSError) as error:
                on_error(f"{type(error).__name__}: {error}")
                continue
            on_answer(status, body, time.perf_counter() - sent)

    await asyncio.gather(*(sender(worker) for worker in range(concurrency)))
    return time.perf_counter() - start


async def open_loop(client: Client, *, path: str, rate: float, seconds: float, timeout: float, make_body,
                    on_answer, on_error, max_connections: int = 256, warm_connections: int = 16) -> float:
    """Requests sent at a fixed `rate` for `seconds`, whether or not earlier ones have been
    answered (how production traffic arrives). A request due takes the most recently
    freed keep-alive connection, or opens a new one (up to `max_connections`; beyond that
    it waits for one to free up). Latency runs from each request's scheduled send time,
    so time spent waiting for a connection or queueing in a slow server is counted too.
    `warm_connections` are opened before the clock starts, as an integrator's HTTP client
    keeps a pool (opening hundreds in the first instant measured the server's accept
    path, not its checks)."""
    loop = asyncio.get_running_loop()
    idle: list[Connection] = [await client.connection() for _ in range(warm_connections)]
    live: set[Connection] = set(idle)
    backlog: deque[tuple[bytes, float]] = deque()  # (request, scheduled), oldest first
    total = int(rate * seconds)
    finished = loop.create_future()
    answered = 0

    def free(conn: Connection) -> None:
        if conn.closing and not conn.closed:
            conn.transport.close()
            conn.closed = True
        if conn.closed:
            live.discard(conn)  # the server closed it (keep-alive timeout, restart, Connection: close)
            if backlog:
                dispatch()
        elif backlog:
            send(conn, *backlog.popleft())
        else:
            conn.idle_since = loop.time()
            idle.append(conn)

    def send(conn: Connection, request: bytes, scheduled: float) -> None:
        def done(status, body) -> None:
            nonlocal answered
            answered += 1
            if status is None:
                on_error(f"{type(body).__name__}: {body}")
            else:
                on_answer(status, body, time.perf_counter() - scheduled)
            free(conn)
            if answered == total and not finished.done():
                finished.set_result(None)

        conn.start(request, timeout, done)

    async def open_one() -> None:
        nonlocal answered
        try:
            _, conn = await loop.create_connection(Connection, client.host, client.port)
        except OSError as error:
            if backlog:  # the request it was opened for fails, so the phase still ends
                backlog.popleft()
                answered += 1
                on_error(f"connect: {error}")
                if answered == total and not finished.done():
                    finished.set_result(None)
            return
        client.opened += 1
        live.add(conn)
        free(conn)

    opening: set[asyncio.Task] = set()

    def dispatch() -> None:
        """Hand waiting requests to idle connections; open more while some still wait."""
        while backlog and idle:
            conn = idle.pop()
            if conn.stale():
                live.discard(conn)
                continue
            send(conn, *backlog.popleft())
        waiting = len(backlog) - len(opening)
        while waiting > 0 and len(live) + len(opening) < max_connections:
            task = loop.create_task(open_one())
            opening.add(task)
            task.add_done_callback(opening.discard)
            waiting -= 1

    start = time.perf_counter()
    seq = 0
    while seq < total:
        now = time.perf_counter()
        while seq < total and start + seq / rate <= now:  # everything due by now
            backlog.append((client.request(path, make_body(0, seq)), start + seq / rate))
            seq += 1
        dispatch()
        await asyncio.sleep(max(0.0, start + seq / rate - time.perf_counter()))
    if total:
        await finished
    elapsed = time.perf_counter() - start
    for conn in live:
        if conn.transport is not None:
            conn.transport.close()
    return elapsed
