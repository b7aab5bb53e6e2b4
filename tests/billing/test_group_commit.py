"""Group commit of single events: concurrent requests of one process share a
transaction, and each still gets exactly its own answer, after the commit."""

from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from billing.models import UsageEvent
from billing.services.api_keys import api_key_create
from billing.services.group_commit import EventRecorder
from billing.services.metering import EventInput
from tests.concurrency import run_concurrently
from tests.factories import FeatureFactory, make_customer, pro_plan
from tests.ledger import assert_ledger_consistent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def customers():
    FeatureFactory(code="api")
    plan = pro_plan()
    started = timezone.now() - timedelta(days=1)  # events here are stamped "now", in real time
    return [make_customer(plan, external_id=f"c{i}", started_at=started) for i in range(4)]


def committed_events() -> int:
    """Counted on a connection of its own: only what was committed."""
    with connections.create_connection("default").cursor() as cursor:
        cursor.execute("SELECT count(*) FROM billing_usageevent")
        return cursor.fetchone()[0]


def test_concurrent_events_share_transactions_and_each_gets_its_own_answer(customers):
    recorder = EventRecorder(max_events=200)
    calls = [(EventInput(event_id=f"e{i}", customer=f"c{i % 4}", feature="api", quantity=Decimal(i + 1)),)
             for i in range(48)]

    def record(event):
        result = recorder.record(event)
        # Answered means committed: another connection sees it.
        return result, committed_events() >= 1

    outcomes = run_concurrently(record, calls)

    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    for (event,), (result, seen) in zip(calls, outcomes):
        assert result.created and result.error is None and seen
        assert (result.event.event_id, result.event.customer.external_id, result.event.quantity) == (
            event.event_id, event.customer, event.quantity)
    assert UsageEvent.objects.count() == 48
    assert 1 <= recorder.groups_recorded < 48  # shared transactions
    assert_ledger_consistent()


def test_the_same_event_sent_at_once_by_many_requests_is_recorded_once(customers):
    recorder = EventRecorder(max_events=200)
    event = EventInput(event_id="dup", customer="c0", feature="api", quantity=Decimal("5"))

    outcomes = run_concurrently(recorder.record, [(event,)] * 16)

    assert sorted(o.created for o in outcomes) == [False] * 15 + [True]
    assert UsageEvent.objects.filter(event_id="dup").count() == 1


def test_one_bad_event_does_not_spoil_its_group(customers):
    recorder = EventRecorder(max_events=200)
    calls = [(EventInput(event_id="good", customer="c0", feature="api", quantity=Decimal("1")),),
             (EventInput(event_id="bad", customer="c0", feature="nope", quantity=Decimal("1")),),
             (EventInput(event_id="ghost", customer="nobody", feature="api", quantity=Decimal("1")),)]

    good, bad, ghost = run_concurrently(recorder.record, calls)

    assert good.created and (bad.error.code, ghost.error.code) == ("unknown_feature", "customer_not_found")
    assert list(UsageEvent.objects.values_list("event_id", flat=True)) == ["good"]


def test_the_api_answers_through_the_recorder_when_group_commit_is_on(customers, settings):
    settings.OVERAGE_GROUP_COMMIT = True
    _, key = api_key_create(name="t")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    body = {"id": "api-1", "customer": "c1", "feature": "api", "quantity": "3"}

    first = client.post("/api/v1/events", body, content_type="application/json")
    again = client.post("/api/v1/events", body, content_type="application/json")
    refused = client.post("/api/v1/events", {**body, "id": "api-2", "feature": "nope"},
                          content_type="application/json")

    assert (first.status_code, first.json()["credits"], again.status_code) == (201, "3", 200)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "unknown_feature")
    assert committed_events() == 1


def test_a_group_records_the_customers_it_can_lock_and_sends_the_rest_again(customers):
    """Another process's group holds c0: this group records c1 at once instead of
    waiting behind it, and c0's event follows once c0 is free."""
    recorder = EventRecorder(max_events=200)
    other = connections.create_connection("default")
    other.set_autocommit(False)
    with other.cursor() as cursor:
        cursor.execute("SELECT id FROM billing_customer WHERE external_id = 'c0' FOR UPDATE")
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        held = pool.submit(recorder.record, EventInput(event_id="held", customer="c0", feature="api",
                                                       quantity=Decimal("1")))
        free = pool.submit(recorder.record, EventInput(event_id="free", customer="c1", feature="api",
                                                       quantity=Decimal("2")))

        assert free.result(timeout=30).created  # answered while c0 is still locked
        assert not held.done()
        assert committed_events() == 1
    finally:
        other.rollback()
        other.close()
    assert held.result(timeout=30).created
    pool.shutdown()
    assert sorted(UsageEvent.objects.values_list("event_id", flat=True)) == ["free", "held"]
    assert_ledger_consistent()


def test_a_request_that_gave_up_waiting_neither_stops_the_recorder_nor_its_group(customers):
    """A request cancelled while its event is queued (the check server cancels a request
    whose client went away) is left out; the events around it are recorded and answered,
    and the recorder keeps going. Setting the answer of a cancelled request used to raise
    in the recorder thread and end it, leaving every later request waiting."""
    recorder = EventRecorder(max_events=200)
    waiting = [Future() for _ in range(3)]
    for i, future in enumerate(waiting):
        recorder._queue.put((EventInput(event_id=f"q{i}", customer="c0", feature="api", quantity=Decimal("1")),
                             future))
    assert waiting[1].cancel()
    recorder._ensure_thread()

    assert waiting[0].result(timeout=30).created and waiting[2].result(timeout=30).created
    later = recorder.record(EventInput(event_id="later", customer="c1", feature="api", quantity=Decimal("1")))
    assert later.created and recorder._thread.is_alive()
    assert sorted(UsageEvent.objects.values_list("event_id", flat=True)) == ["later", "q0", "q2"]
