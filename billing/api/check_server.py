"""The check server: an ASGI application for gunicorn's asyncio worker
(`gunicorn config.asgi:application --worker-class asgi`) that answers plain entitlement
checks on its event loop, and every other request through the WSGI application in a
thread pool.

Why a second server for one endpoint: integrators ask before every call they serve, so
checks come at the rate of their traffic. In gunicorn's threaded worker a plain check
cost 1.0-1.3 ms of CPU, of which the check itself (the fast lane: authentication, rate
limit, a Redis read of two tokens, the decision, the answer) was 0.5 ms; the rest was the
worker's hand-offs between its threads and the GIL they share. On the event loop the same
check costs 0.75-0.9 ms, with no thread hand-off (docs/benchmarks.md).

A request goes:
- `POST /api/v1/entitlements/check` with a declared body of at most 4 KB: read on the
  loop, then `EntitlementCheckFastLane.answer_inline`, which answers from the process's
  caches and Redis only: an API key this process authenticated lately, a cached credit
  position whose tokens still match. It never touches PostgreSQL (Django refuses database
  access on an event loop; anything that would need it raises NeedsDatabase). What keeps
  those caches warm (a position past its lifetime, a key's copy past half its time, the
  key's last use) is done in a background thread (billing/services/refresh_ahead.py);
- `POST /api/v1/events` (a single event, with group commit on): read, authenticated,
  rate-limited and validated on the loop (`EntitlementCheckFastLane.event_inline`), then
  handed to the process's group-commit recorder thread and awaited there, so a waiting
  event holds no thread; a recorded event is answered on the loop, anything else
  (a refusal, a failed group: nothing written) by the threads. In gunicorn's threaded
  worker a single event cost ~1 ms of CPU before recording, and the worker's 16 threads
  capped a process's group at 16 events;
- everything else, and a check that needs the database (a key not seen lately, a
  position to rebuild after a write, a reservation, any refusal or error answer): the
  WSGI application of config/wsgi.py, fast lane included, in a thread through a2wsgi,
  exactly as the threaded server would answer it.

The inline checks all run in one context: Django keeps its cache connections per
context, and a fresh one per request opened a new Redis connection for every check.
"""

import asyncio
import contextvars
import io

from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi import build_environ
from django.conf import settings

from billing.api.fast_lane import CHECK_PATH, EVENTS_PATH, MAX_BODY_BYTES
from billing.api.throttling import LANE_DECISION
from billing.services.commit_hooks import prepare_to_send_tasks
from billing.services.group_commit import event_recorder
from billing.services.refresh_ahead import refresh_later


# Single events a process keeps waiting on its event loop; more go to the threads.
MAX_EVENTS_WAITING = 1000
RECORD_TIMEOUT_SECONDS = 60


class CheckServer:
    def __init__(self, wsgi_application, *, threads: int | None = None):
        self.lane = wsgi_application  # the EntitlementCheckFastLane of config/wsgi.py
        self.threaded = WSGIMiddleware(_DecisionCarried(wsgi_application),
                                       workers=threads or settings.OVERAGE_CHECK_SERVER_THREADS)
        self._context = contextvars.copy_context()
        self.events_waiting = 0  # single events of this process awaiting the recorder on the loop

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in (CHECK_PATH, EVENTS_PATH)
                and _declared_length(scope) is not None):
            messages, body = await _read_body(receive)
            if body is not None:
                environ = build_environ(scope, io.BytesIO(body))
                if scope["path"] == CHECK_PATH:
                    response = self._context.run(self.lane.answer_inline, environ, body)
                else:
                    response = await self._record_inline(environ, body)
                if response is not None:
                    await _send_response(response, send)
                    return
                if LANE_DECISION in environ:  # counted on the loop: the thread reuses the decision
                    scope = dict(scope, **{LANE_DECISION: environ[LANE_DECISION]})
            receive = _replay(messages, receive)
        await self.threaded(scope, receive, send)

    async def _record_inline(self, environ, body: bytes):
        """A plain single event: read and checked on the loop, recorded by the process's
        group-commit recorder (awaited, no thread held), answered on the loop. None when
        the threads must answer it: anything `event_inline` hands on, a refused event,
        a group that failed (nothing of it was written: the full stack decides again)."""
        prepared = self._context.run(self.lane.event_inline, environ, body)
        if prepared is None:
            return None
        request, event = prepared
        if self.events_waiting >= MAX_EVENTS_WAITING:
            return None  # the threads' bounded pool is the back-pressure beyond this
        self.events_waiting += 1
        try:
            # Shielded: a request cancelled (its client gone) stops waiting, but an event
            # already being recorded is not taken back. The same bound as a thread's wait.
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(event_recorder().submit(event))),
                                            RECORD_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - a failed group (logged by the recorder) or a timeout: the full
            return None    # stack decides again, and an event recorded meanwhile is then a retry
        finally:
            self.events_waiting -= 1
        if result.error is not None:
            return None
        return self._context.run(self.lane.event_answer, request, result)


class _DecisionCarried:
    """The WSGI application for the threads, given the rate-limit decision the event loop
    already counted for this request (a2wsgi puts the scope in the environ), so that a
    check refused on the loop is counted once."""

    def __init__(self, wsgi_application):
        self.wsgi_application = wsgi_application

    def __call__(self, environ, start_response):
        decision = environ.get("asgi.scope", {}).get(LANE_DECISION)
        if decision is not None:
            environ[LANE_DECISION] = decision
        return self.wsgi_application(environ, start_response)


def _declared_length(scope) -> int | None:
    """The declared body size when it is a plain number up to MAX_BODY_BYTES, else None."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if 0 < length <= min(MAX_BODY_BYTES, settings.OVERAGE_API_MAX_BODY_BYTES) else None
    return None


async def _read_body(receive) -> tuple[list[dict], bytes | None]:
    """The messages read and the whole body, or None for the body when the client
    disconnected or sent more than MAX_BODY_BYTES (the threaded path then answers, with
    the messages replayed)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _send_response(response, send) -> None:
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.content})


def _prepare_to_send_tasks() -> None:
    from billing import tasks  # imported by the first refresh ahead otherwise (~15 ms: it imports stripe)

    prepare_to_send_tasks(tasks.rebuild_position_task.app)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            refresh_later("prepare to send tasks", _prepare_to_send_tasks)  # in the background: never delays start
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
