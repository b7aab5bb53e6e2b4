"""The broker (Redis) down: a write's follow-up tasks are kept in the database and sent
once it is back (billing.services.commit_hooks); the write itself is not held up."""

import time
from decimal import Decimal

import pytest
import redis
import time_machine
from celery import Celery

from billing.models import DeferredTask, UsageEvent
from billing.services import commit_hooks
from billing.services.commit_hooks import requeue_deferred_tasks, send_task
from tests.redis_support import redis_up, redis_url
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

REDIS_URL = redis_url(9)
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens there
NOW = utc(2026, 5, 10, 9)



pytestmark = [pytest.mark.django_db,
              pytest.mark.skipif(not redis_up(REDIS_URL), reason="needs Redis on 127.0.0.1:6379")]


@pytest.fixture(autouse=True)
def broker_state():
    commit_hooks._broker_down_until = 0.0
    queue = redis.Redis.from_url(REDIS_URL)
    queue.flushdb()
    yield queue
    queue.flushdb()
    commit_hooks._broker_down_until = 0.0


def follow_up_on(broker_url: str):
    app = Celery("follow-ups", broker=broker_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False

    @app.task(name="tests.follow_up")
    def follow_up(customer_id):
        return customer_id

    return app, follow_up


def test_tasks_wait_in_the_database_while_the_broker_is_down_and_are_sent_once_it_is_back(broker_state, caplog):
    _, follow_up = follow_up_on(NOWHERE)
    caplog.set_level("WARNING", logger="billing.services.commit_hooks")

    send_task(follow_up, (1,), {})  # refused: kept
    assert list(DeferredTask.objects.values_list("task", "args")) == [("tests.follow_up", [1])]
    assert len(caplog.records) == 1

    # For the next 10 s the process does not try the broker again: a batch with many
    # follow-ups pays one connection failure, not one each.
    send_task(follow_up, (2,), {"countdown": 60})
    assert list(DeferredTask.objects.order_by("id").values_list("args", "options")) == [
        ([1], {}), ([2], {"countdown": 60})]
    assert len(caplog.records) == 1
    # (Real time, ticking: kombu times its connection attempts, a frozen clock never ends them.)
    with time_machine.travel(time.time() + 11, tick=True):
        send_task(follow_up, (3,), {})
    assert len(caplog.records) == 2 and DeferredTask.objects.count() == 3

    # The broker is back: the beat's requeue sends what was kept, oldest first, and forgets it.
    app, _ = follow_up_on(REDIS_URL)
    assert requeue_deferred_tasks(app=app) == 3
    assert DeferredTask.objects.count() == 0 and broker_state.llen("celery") == 3
    assert requeue_deferred_tasks(app=app) == 0


def test_a_requeue_that_fails_keeps_every_task(broker_state):
    DeferredTask.objects.create(task="tests.follow_up", args=[1])
    DeferredTask.objects.create(task="tests.follow_up", args=[2])
    down, _ = follow_up_on(NOWHERE)
    with pytest.raises(Exception):
        requeue_deferred_tasks(app=down)
    assert DeferredTask.objects.count() == 2


@time_machine.travel(NOW, tick=True)  # kombu times its connection attempts: a frozen clock never ends them
def test_an_event_is_recorded_with_the_broker_down_and_its_alert_check_kept(api, settings,
                                                                             django_capture_on_commit_callbacks):
    """Through the API, with the project's Celery app pointed at a broker that is down."""
    from config.celery import app

    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    saved = app.conf.task_always_eager, app.conf.broker_url
    app.conf.task_always_eager, app.conf.broker_url = False, NOWHERE
    app._pool = app.amqp._producer_pool = None  # connections built for the old URL are not reused
    try:
        with django_capture_on_commit_callbacks(execute=True):
            response = api.post("/api/v1/events", {"id": "e1", "customer": "acme", "feature": "gpt-4o",
                                                   "quantity": "600"}, format="json")  # 60 % of 10 000
    finally:
        app.conf.task_always_eager, app.conf.broker_url = saved
        app._pool = app.amqp._producer_pool = None
    assert response.status_code == 201, response.content
    assert UsageEvent.objects.filter(event_id="e1").count() == 1
    assert list(DeferredTask.objects.values_list("task", flat=True)) == ["billing.tasks.check_alerts_task"]


def test_the_admin_lists_the_tasks_waiting_for_the_broker(admin_client):
    from django.urls import reverse

    DeferredTask.objects.create(task="billing.tasks.check_alerts_task", args=[1, 2, None])
    response = admin_client.get(reverse("admin:billing_deferredtask_changelist"))
    assert response.status_code == 200
    assert b"billing.tasks.check_alerts_task" in response.content and b"[1, 2, null]" in response.content
