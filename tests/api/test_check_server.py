"""The check server (billing/api/check_server.py, config/asgi.py) answers exactly what
Django's full stack answers. A plain check whose key and credit position this process
already holds is answered on the event loop, without the database; every other request
(a cold check, a check after a write, a refusal, a reservation, any other endpoint) is
answered by the WSGI application in the server's thread pool. Every request here is sent
through the ASGI application as gunicorn's asyncio worker sends it, and the answer
(status, headers, body) is compared with what Django's handler answers for it.

The thread pool uses its own database connections, so these tests commit their data
(`transaction=True`). The event loop must never reach the database: Django would refuse
(SynchronousOnlyOperation) and the server log it, which fails every test here."""

import asyncio
import io
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from a2wsgi.wsgi import build_environ
from django.core.cache import cache

from billing.api.check_server import CheckServer
from billing.models import ApiKey, Reservation, UsageEvent
from billing.services import api_keys, positions, refresh_ahead
from billing.services.api_keys import api_key_create
from billing.services.metering import EventInput, record_event
from config.wsgi import application
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db(transaction=True)
NOW = utc(2026, 5, 10, 9)
PATH = "/api/v1/entitlements/check"
PLAIN = {"customer": "acme", "feature": "gpt-4o"}
JSON = "application/json"
# 10 005 credits against 10 000 included: 5 overage credits at USD 0.002.
OVERAGE = {"customer": "acme", "feature": "gpt-4o", "quantity": "1000.5"}
OVERAGE_ANSWER = {
    "allowed": True, "reason": "overage", "credits_required": "10005", "credits_remaining": "10000",
    "overage_credits": "5", "estimated_overage_amount": "0.01", "currency": "USD",
    "reservation_id": None, "reservation_expires_at": None,
}


@pytest.fixture(autouse=True)
def cold_process(settings):
    """Positions cached (as with Redis), and nothing remembered from another test: the
    process has authenticated no key and used no position yet."""
    settings.OVERAGE_POSITION_CACHE_SECONDS = 30
    settings.ALLOWED_HOSTS = ["api.example.com"]
    api_keys._recently_authenticated.clear()
    positions._recent.clear()
    yield
    api_keys._recently_authenticated.clear()
    positions._recent.clear()


@pytest.fixture(autouse=True)
def no_fault_logged(caplog):
    """Neither path may fail on its way to an answer: on the event loop that would be a
    database access ("entitlement check on the event loop failed"), in a thread a fault
    of the lane."""
    yield
    faults = [record.getMessage() for record in caplog.get_records("call")
              if record.name.startswith("billing") and record.levelno >= logging.WARNING]
    assert faults == []


@pytest.fixture
def server():
    server = CheckServer(application)
    yield server
    server.threaded.executor.shutdown(wait=True)  # its threads' database connections with it


@pytest.fixture
def acme():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    return make_customer(pro_plan(overage_cap=Decimal("5")), started_at=utc(2026, 5, 1), external_id="acme")


@pytest.fixture
def ingest_key(acme) -> tuple[ApiKey, str]:
    return api_key_create(name="checks", scopes=["ingest"])


@pytest.fixture
def key(ingest_key) -> str:
    return ingest_key[1]


def http(body=PLAIN, *, key=None, method="POST", path=PATH, query=b"", **header_changes) -> tuple[dict, bytes]:
    """An ASGI scope and its body, as gunicorn's asyncio worker builds them. A header
    given as None is left out (`content_length=None`)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"host": "api.example.com", "content-type": "application/json", "content-length": str(len(raw)),
               "accept": "*/*"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    headers.update({name.replace("_", "-"): value for name, value in header_changes.items()})
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "https", "path": path, "raw_path": path.encode(), "query_string": query,
        "root_path": "", "server": ("api.example.com", 443), "client": ("203.0.113.9", 51234),
        "headers": [(name.encode(), value.encode()) for name, value in headers.items() if value is not None],
    }
    return scope, raw


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    by: str  # "event loop", "lane in a thread" or "django in a thread"

    @property
    def exactly(self) -> tuple[int, dict[str, str], bytes]:
        return self.status, self.headers, self.body

    def json(self):
        return json.loads(self.body)


def send(server, request, *, chunks: int = 1) -> Answer:
    """The server's answer to `request`, its body sent in `chunks` messages."""
    scope, raw = request
    step = -(-len(raw) // chunks) or 1
    parts = [raw[at:at + step] for at in range(0, len(raw), step)] or [b""]
    messages = [{"type": "http.request", "body": part, "more_body": n < len(parts) - 1}
                for n, part in enumerate(parts)]
    served, served_inline, events_inline = application.served, application.served_inline, application.events_inline
    sent = asyncio.run(_exchange(server, scope, messages))
    start, rest = sent[0], sent[1:]
    assert start["type"] == "http.response.start" and rest and not rest[-1].get("more_body", False)
    if application.served_inline == served_inline + 1 or application.events_inline == events_inline + 1:
        by = "event loop"
    elif application.served == served + 1:
        by = "lane in a thread"
    else:
        by = "django in a thread"
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in start["headers"]}
    return Answer(start["status"], headers, b"".join(message.get("body", b"") for message in rest), by)


async def _exchange(app, scope, messages) -> list[dict]:
    pending, sent = list(messages), []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def django_answers(request) -> tuple[int, dict[str, str], bytes]:
    """What Django's handler, without the fast lane, answers to the same request."""
    scope, raw = request
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split(" ", 1)[0])
        answer["headers"] = {name.lower(): value for name, value in headers}

    iterable = application.django_app(build_environ(scope, io.BytesIO(raw)), start_response)
    try:
        body = b"".join(iterable)
    finally:
        iterable.close()
    return answer["status"], answer["headers"], body


@time_machine.travel(NOW, tick=False)
def test_a_repeated_check_is_answered_on_the_event_loop_exactly_as_django_answers(server, ingest_key):
    api_key, key = ingest_key
    cold = send(server, http(OVERAGE, key=key))
    warm = send(server, http(OVERAGE, key=key))
    assert (cold.by, warm.by) == ("lane in a thread", "event loop")
    assert warm.status == 200 and warm.json() == OVERAGE_ANSWER
    assert warm.headers["content-type"] == "application/json" and warm.headers["x-frame-options"] == "DENY"
    assert warm.headers["content-length"] == str(len(warm.body))
    assert warm.exactly == cold.exactly == django_answers(http(OVERAGE, key=key))
    # The thread ran at the travelled time too: it recorded the key's use at NOW.
    api_key.refresh_from_db()
    assert api_key.last_used_at == NOW


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("body", [
    {"customer": "acme", "feature": "gpt-4o"},
    {"customer": "acme", "feature": "gpt-4o", "quantity": 5000},  # past the USD 5 cap
    {"customer": "acme", "feature": "unknown-feature", "quantity": 1},
])
def test_plain_checks_answered_on_the_event_loop_equal_django(server, key, body):
    assert send(server, http(body, key=key)).by == "lane in a thread"
    warm = send(server, http(body, key=key))
    assert warm.by == "event loop" and warm.status == 200
    assert warm.exactly == django_answers(http(body, key=key))


@time_machine.travel(NOW, tick=False)
def test_a_body_in_several_messages_is_read_whole_by_either_path(server, key):
    cold = send(server, http(OVERAGE, key=key), chunks=3)
    warm = send(server, http(OVERAGE, key=key), chunks=3)
    assert (cold.by, warm.by) == ("lane in a thread", "event loop")
    assert cold.json() == warm.json() == OVERAGE_ANSWER


def test_the_keys_last_use_is_still_recorded_when_checks_are_answered_on_the_event_loop(server, ingest_key,
                                                                                          settings):
    """The key's last use is written at most once a minute; when a check on the event loop
    finds it due, the check is answered there and the write is made in the background
    (the event loop never writes)."""
    settings.OVERAGE_POSITION_CACHE_SECONDS = 600  # the position outlives the minute
    settings.OVERAGE_API_KEY_CACHE_SECONDS = 600  # and so does the process's copy of the key
    api_key, key = ingest_key
    with time_machine.travel(NOW, tick=False):
        assert [send(server, http(key=key)).by for _ in range(2)] == ["lane in a thread", "event loop"]
    later = NOW + timedelta(seconds=61)
    with time_machine.travel(later, tick=False):
        assert [send(server, http(key=key)).by for _ in range(2)] == ["event loop", "event loop"]
        refresh_ahead.drained().result(timeout=30)
    api_key.refresh_from_db()
    assert api_key.last_used_at == later


@time_machine.travel(NOW, tick=False)
def test_a_key_is_looked_up_again_in_the_background_before_its_copy_expires(server, ingest_key, settings):
    """From half of OVERAGE_API_KEY_CACHE_SECONDS on, a check on the event loop keeps
    using the process's copy of the key and has it looked up again in the background: the
    checks of the instant it would have expired are not all sent to threads at once."""
    settings.OVERAGE_API_KEY_CACHE_SECONDS = 5
    api_key, key = ingest_key
    assert [send(server, http(key=key)).by for _ in range(2)] == ["lane in a thread", "event loop"]
    digest = api_keys._hash(key)
    aged = time.monotonic() - 3  # past half of its 5 s
    api_keys._recently_authenticated[digest] = (api_keys._recently_authenticated[digest][0], aged)
    assert send(server, http(key=key)).by == "event loop"
    refresh_ahead.drained().result(timeout=30)
    assert api_keys._recently_authenticated[digest][1] > aged + 2  # looked up again just now

    api_key.revoked_at = NOW  # revoked elsewhere: the next lookup drops the copy
    api_key.save(update_fields=["revoked_at"])
    api_keys._recently_authenticated[digest] = (api_keys._recently_authenticated[digest][0], time.monotonic() - 3)
    assert send(server, http(key=key)).by == "event loop"  # within its 5 s, as in any process
    refresh_ahead.drained().result(timeout=30)
    refused = send(server, http(key=key))
    assert (refused.status, refused.by) == (401, "django in a thread")


@time_machine.travel(NOW, tick=False)
def test_a_check_after_a_write_is_not_answered_from_the_stale_position(server, key):
    one_call = {"customer": "acme", "feature": "gpt-4o", "quantity": "1"}
    assert send(server, http(one_call, key=key)).json()["credits_remaining"] == "10000"
    assert send(server, http(one_call, key=key)).by == "event loop"
    record_event(event=EventInput(event_id="e1", customer="acme", feature="gpt-4o", quantity=Decimal("999"),
                                  timestamp=NOW), now=NOW)  # 9 990 credits
    after = send(server, http(one_call, key=key))
    again = send(server, http(one_call, key=key))
    assert (after.by, again.by) == ("lane in a thread", "event loop")
    assert after.json() == again.json() == {
        "allowed": True, "reason": "ok", "credits_required": "10", "credits_remaining": "10",
        "overage_credits": "0", "estimated_overage_amount": "0.00", "currency": "USD",
        "reservation_id": None, "reservation_expires_at": None,
    }
    assert again.exactly == django_answers(http(one_call, key=key))


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("case, changes, status, content_type", [
    ("no key", {"authorization": None}, 401, JSON),
    ("unknown key", {"authorization": "Bearer ovg_nope_nope"}, 401, JSON),
    ("unknown customer", {"body": {"customer": "nobody", "feature": "gpt-4o"}}, 404, JSON),
    ("invalid quantity", {"body": {"customer": "acme", "feature": "gpt-4o", "quantity": "-1"}}, 400, JSON),
    ("not JSON", {"body": b"{nope"}, 400, JSON),
    ("no body", {"body": b""}, 400, JSON),
    ("a body over 4 KB", {"body": {**PLAIN, "padding": "x" * 5000}}, 200, JSON),
    ("declared too large", {"content_length": "99999999"}, 413, JSON),
    ("form body", {"content_type": "application/x-www-form-urlencoded"}, 415, JSON),
    ("HTML wanted", {"accept": "text/html"}, 406, JSON),
    ("format override", {"query": b"format=json"}, 200, JSON),
    ("host not allowed", {"host": "evil.example.net"}, 400, "text/html; charset=utf-8"),
    ("GET", {"method": "GET"}, 405, JSON),
])
def test_everything_else_is_answered_in_a_thread_exactly_as_django_answers(server, key, case, changes, status,
                                                                          content_type):
    """Sent once the process holds the key and the position, so that the event loop
    could have answered it and had to decline."""
    assert [send(server, http(key=key)).by for _ in range(2)] == ["lane in a thread", "event loop"]
    changes = dict(changes)
    request = http(changes.pop("body", PLAIN), key=key, **changes)
    answer = send(server, request)
    assert (answer.status, answer.by) == (status, "django in a thread"), case
    assert answer.exactly == django_answers(request), case
    assert answer.headers["content-type"] == content_type, case


@time_machine.travel(NOW, tick=False)
def test_a_key_without_the_ingest_scope_is_refused_in_a_thread(server, acme):
    reader = api_key_create(name="reader", scopes=["read"])[1]
    features = send(server, http(b"", key=reader, method="GET", path="/api/v1/features", content_length=None))
    assert features.status == 200 and features.by == "django in a thread"
    assert [feature["code"] for feature in features.json()] == ["gpt-4o"]
    # The key is now one this process authenticated: the event loop sees it, and declines.
    refused = send(server, http(key=reader))
    assert (refused.status, refused.by) == (403, "django in a thread")
    assert refused.json()["error"]["code"] and refused.exactly == django_answers(http(key=reader))


@time_machine.travel(NOW, tick=False)
def test_a_reservation_is_made_in_a_thread_once(server, key):
    assert [send(server, http(key=key)).by for _ in range(2)] == ["lane in a thread", "event loop"]
    reserved = send(server, http({**PLAIN, "reserve": True}, key=key))
    assert (reserved.status, reserved.by) == (200, "django in a thread")
    assert reserved.json()["reservation_id"] == str(Reservation.objects.get(customer__external_id="acme").pk)


def test_lifespan_startup_and_shutdown_are_completed(server):
    async def lifespan():
        pending = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return pending.pop(0)

        async def send(message):
            sent.append(message)

        await server({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        return sent

    assert asyncio.run(lifespan()) == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


@time_machine.travel(NOW, tick=False)
def test_the_rate_limit_holds_whichever_path_answers(server, key, settings):
    settings.OVERAGE_API_RATES = {**settings.OVERAGE_API_RATES, "ingest": "3/min"}
    answers = [send(server, http(key=key)) for _ in range(5)]
    assert [(answer.status, answer.by) for answer in answers] == [
        (200, "lane in a thread"), (200, "event loop"), (200, "event loop"),
        (429, "django in a thread"), (429, "django in a thread")]
    assert answers[3].json()["error"]["code"] == "rate_limited"
    assert answers[3].headers["retry-after"] == "60"  # NOW is the start of its minute


@time_machine.travel(NOW, tick=False)
def test_each_check_is_counted_once_whichever_path_answers(server, ingest_key, settings):
    settings.OVERAGE_API_RATES = {**settings.OVERAGE_API_RATES, "ingest": "3/min"}
    api_key, key = ingest_key
    for _ in range(5):
        send(server, http(key=key))
    window_start = int(NOW.timestamp()) // 60 * 60
    assert cache.get(f"throttle:api:ingest:{api_key.pk}:60:{window_start}") == 5


# --- Single events -------------------------------------------------------------------------

EVENTS = "/api/v1/events"


def usage(event_id, **changes):
    return {"id": event_id, "customer": "acme", "feature": "gpt-4o", "quantity": "2",
            "properties": {"region": "eu"}, **changes}


@pytest.fixture
def group_commit(settings):
    settings.OVERAGE_GROUP_COMMIT = True


@time_machine.travel(NOW, tick=False)
def test_a_single_event_is_recorded_from_the_event_loop_and_answered_as_django_answers(server, key, group_commit):
    """Once the process knows the key, a plain event is read on the loop and recorded by
    the group-commit recorder without a thread of its own; the answer is Django's."""
    first = send(server, http(usage("e1"), key=key, path=EVENTS))
    assert (first.status, first.by) == (201, "django in a thread")  # the key is not known yet
    loop = send(server, http(usage("e2"), key=key, path=EVENTS))
    assert (loop.status, loop.by) == (201, "event loop")
    assert loop.json()["credits"] == "20" and loop.json()["status"] == "accepted"
    retried = django_answers(http(usage("e2"), key=key, path=EVENTS))  # the full stack: a retry, 200
    assert retried[0] == 200 and (loop.headers, loop.body) == (retried[1], retried[2])
    again = send(server, http(usage("e2"), key=key, path=EVENTS))
    assert (again.by, again.exactly) == ("event loop", retried)
    assert UsageEvent.objects.filter(customer__external_id="acme").count() == 2
    assert_ledger_consistent()


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("case, body, status", [
    ("unknown feature", usage("bad", feature="nope"), 422),
    ("id reused with another body", usage("e1", quantity="3"), 409),
    ("invalid quantity", usage("neg", quantity="-1"), 400),
])
def test_a_refused_event_is_answered_in_a_thread_exactly_as_django_answers(server, key, group_commit, case, body,
                                                                          status):
    assert [send(server, http(usage(i), key=key, path=EVENTS)).by for i in ("e0", "e1")] == [
        "django in a thread", "event loop"]
    answer = send(server, http(body, key=key, path=EVENTS))
    assert (answer.status, answer.by) == (status, "django in a thread"), case
    assert answer.exactly == django_answers(http(body, key=key, path=EVENTS)), case
    assert sorted(UsageEvent.objects.values_list("event_id", flat=True)) == ["e0", "e1"]


@time_machine.travel(NOW, tick=False)
def test_without_group_commit_events_are_recorded_in_a_thread(server, key, settings):
    settings.OVERAGE_GROUP_COMMIT = False
    answers = [send(server, http(usage(f"e{i}"), key=key, path=EVENTS)) for i in range(2)]
    assert [(a.status, a.by) for a in answers] == [(201, "django in a thread")] * 2


@time_machine.travel(NOW, tick=False)
def test_each_event_is_counted_once_for_the_rate_limit_whichever_path_answers(server, ingest_key, group_commit,
                                                                               settings):
    settings.OVERAGE_API_RATES = {**settings.OVERAGE_API_RATES, "ingest": "3/min"}
    api_key, key = ingest_key
    answers = [send(server, http(usage(f"e{i}"), key=key, path=EVENTS)) for i in range(5)]
    assert [(a.status, a.by) for a in answers] == [
        (201, "django in a thread"), (201, "event loop"), (201, "event loop"),
        (429, "django in a thread"), (429, "django in a thread")]
    window_start = int(NOW.timestamp()) // 60 * 60
    assert cache.get(f"throttle:api:ingest:{api_key.pk}:60:{window_start}") == 5


def test_a_reservation_asked_without_the_database_says_it_needs_the_database():
    """`check_entitlement(reserve=True, cached_only=True)` (the event loop's call) must
    hand the request on with NeedsDatabase, never write or fail otherwise."""
    from billing.errors import NeedsDatabase
    from billing.services.entitlements import check_entitlement

    with pytest.raises(NeedsDatabase):
        check_entitlement(customer_external_id="acme", feature_code="api", quantity=Decimal("1"), reserve=True,
                          now=utc(2026, 5, 10), cached_only=True)
