"""Ingestion queues a follow-up only where the batch may have made one due: an alert
check when included usage crosses one of the customer's thresholds, overage starts, or an event is refused at the cap; a top-up check only for customers
with automatic top-up on. At thousands of events a second, a check per batch per
customer would cost more than the ingestion itself."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import Alert
from billing.services.commit_hooks import send_task
from billing.services.metering import EventInput, record_event
from billing.services.preferences import alert_preferences_set
from billing.services.purchases import auto_topup_configure
from plans.models import CreditPack
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 10)


def queued(callbacks) -> list[str]:
    """Names of the celery tasks the captured after-commit callbacks would queue."""
    names = []
    for callback in callbacks:
        cells = dict(zip(callback.__code__.co_freevars, (c.cell_contents for c in callback.__closure__ or ())))
        func, args = cells.get("func"), cells.get("args", ())
        if func is send_task:  # enqueue(task, …): the task is its first argument
            names.append(args[0].name.rsplit(".", 1)[-1])
        else:
            names.append(getattr(getattr(func, "__self__", None), "name", getattr(func, "__name__", "?"))
                         .rsplit(".", 1)[-1])
    return names


@pytest.fixture
def acme():
    FeatureFactory(code="api")
    return make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")  # 10 000 included


def send(django_capture_on_commit_callbacks, event_id: str, credits: str) -> list[str]:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        record_event(event=EventInput(event_id=event_id, customer="acme", feature="api", quantity=Decimal(credits),
                                      timestamp=NOW), now=NOW)
    return [name for name in queued(callbacks) if name in ("check_alerts_task", "run_auto_topup_task")]


@time_machine.travel(NOW, tick=False)
def test_an_alert_check_is_queued_only_when_a_threshold_is_crossed(acme, django_capture_on_commit_callbacks):
    assert send(django_capture_on_commit_callbacks, "a", "99") == []          # 0.99 %
    assert send(django_capture_on_commit_callbacks, "b", "1") == []           # 1.00 %: not a threshold
    assert send(django_capture_on_commit_callbacks, "c", "4899") == []        # 49.99 %
    assert send(django_capture_on_commit_callbacks, "d", "1") == ["check_alerts_task"]     # 50 %: the alert
    assert list(Alert.objects.values_list("kind", "threshold")) == [("usage_threshold", 50)]
    assert send(django_capture_on_commit_callbacks, "e", "4999") == ["check_alerts_task"]  # 99.99 %: past 80
    assert send(django_capture_on_commit_callbacks, "f", "1") == ["check_alerts_task"]     # 100 %
    assert send(django_capture_on_commit_callbacks, "g", "5") == ["check_alerts_task"]     # overage starts
    assert send(django_capture_on_commit_callbacks, "h", "5") == []           # overage goes on
    assert sorted(Alert.objects.values_list("kind", "threshold")) == [
        ("overage_started", 0), ("usage_threshold", 50), ("usage_threshold", 80), ("usage_threshold", 100)]


@time_machine.travel(NOW, tick=False)
def test_the_customer_s_own_thresholds_are_the_ones_watched(acme, django_capture_on_commit_callbacks):
    alert_preferences_set(customer=acme, thresholds=[10], email_enabled={})
    assert send(django_capture_on_commit_callbacks, "a", "999") == []         # 9.99 %
    assert send(django_capture_on_commit_callbacks, "b", "1") == ["check_alerts_task"]     # 10 %
    assert send(django_capture_on_commit_callbacks, "c", "4000") == []        # 50 %: not theirs
    assert list(Alert.objects.values_list("kind", "threshold")) == [("usage_threshold", 10)]


@time_machine.travel(NOW, tick=False)
def test_a_threshold_added_below_the_usage_fires_when_it_is_saved(acme, django_capture_on_commit_callbacks):
    send(django_capture_on_commit_callbacks, "a", "3000")  # 30 %: past no default threshold
    assert not Alert.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        alert_preferences_set(customer=acme, thresholds=[25, 90], email_enabled={})
    assert list(Alert.objects.values_list("kind", "threshold")) == [("usage_threshold", 25)]


@time_machine.travel(NOW, tick=False)
def test_a_top_up_check_is_queued_only_for_customers_with_auto_top_up_on(acme, django_capture_on_commit_callbacks):
    assert "run_auto_topup_task" not in send(django_capture_on_commit_callbacks, "a", "10")
    CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                              price=Decimal("12.50"))
    auto_topup_configure(customer=acme, enabled=True, pack_code="boost", threshold=Decimal("1000"))

    assert "run_auto_topup_task" in send(django_capture_on_commit_callbacks, "b", "10")
