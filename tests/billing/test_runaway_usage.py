"""The runaway-usage guard: last hour's burn against the trailing 24 h average, with a
synthetic spike."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from billing.models import Alert, Subscription
from billing.services.alerts import check_runaway_usage
from billing.services.entitlements import check_entitlement
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def send(django_capture_on_commit_callbacks):
    FeatureFactory(code="api-call")

    def send(customer, credits, event_id, *, at):
        with django_capture_on_commit_callbacks(execute=True):
            return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api-call",
                                                 quantity=Decimal(credits), timestamp=at), now=NOW)[0]
    return send


def steady_day(send, customer, credits_per_hour="100"):
    """One event per hour over the 24 h before the last hour: a baseline of
    `credits_per_hour` credits per hour."""
    for hours_ago in range(1, 25):
        send(customer, credits_per_hour, f"steady-{hours_ago}", at=NOW - timedelta(hours=hours_ago, minutes=30))


def runaway_alerts():
    return list(Alert.objects.filter(kind="runaway_usage"))


@time_machine.travel(NOW, tick=False)
def test_a_spike_fires_the_alert_and_pauses_usage_when_the_plan_says_so(send, settings, mailoutbox):
    settings.ADMINS = [("Ops", "ops@business.test")]
    customer = make_customer(pro_plan(included_credits=Decimal("100000"), runaway_multiplier=Decimal("3"),
                                      runaway_pauses_usage=True), started_at=START)
    steady_day(send, customer)  # 100 credits an hour

    for n in range(3):  # 300 in the last hour: 3 × the average, not more
        send(customer, "100", f"spike-{n}", at=NOW - timedelta(minutes=50 - n))
    assert runaway_alerts() == []

    send(customer, "100", "spike-3", at=NOW - timedelta(minutes=40))  # 400 > 3 × 100

    [alert] = runaway_alerts()
    assert alert.fired_at == NOW
    assert {k: alert.details[k] for k in ("last_hour_credits", "baseline_credits_per_hour", "multiplier", "paused")} \
        == {"last_hour_credits": "400", "baseline_credits_per_hour": "100", "multiplier": "3", "paused": True}
    assert Subscription.objects.get(customer=customer).status == "paused"
    decision = check_entitlement(customer_external_id=customer.external_id, feature_code="api-call",
                                 quantity=Decimal("1"), now=NOW)
    assert (decision.allowed, decision.reason) == (False, "paused")
    refused = send(customer, "1", "after-pause", at=NOW)
    assert (refused.status, refused.reject_reason) == ("rejected", "paused")

    to_customer = [m for m in mailoutbox if m.to == ["billing@acme.test"]]
    to_business = [m for m in mailoutbox if m.to == ["ops@business.test"]]
    assert [m.subject for m in to_customer] == ["Unusual usage: 400 credits in the last hour"]
    assert "more than 3 times its average of 100 credits per hour" in to_customer[0].body
    assert "usage has been paused" in to_customer[0].body
    assert [m.subject for m in to_business] == [
        f"Acme Inc. ({customer.external_id}): Unusual usage: 400 credits in the last hour"]
    assert alert.notifications.count() == 1


@time_machine.travel(NOW, tick=False)
def test_a_spike_on_a_plan_that_does_not_pause_only_alerts_once_per_period(send, mailoutbox):
    customer = make_customer(pro_plan(included_credits=Decimal("100000"), runaway_multiplier=Decimal("3")),
                             started_at=START)
    steady_day(send, customer)

    send(customer, "1000", "spike", at=NOW - timedelta(minutes=5))
    send(customer, "5000", "bigger-spike", at=NOW)

    [alert] = runaway_alerts()
    assert (alert.details["last_hour_credits"], alert.details["paused"]) == ("1000", False)
    assert Subscription.objects.get(customer=customer).status == "active"
    decision = check_entitlement(customer_external_id=customer.external_id, feature_code="api-call",
                                 quantity=Decimal("1"), now=NOW)
    assert (decision.allowed, decision.reason) == (True, "ok")
    assert [m.subject for m in mailoutbox if m.subject.startswith("Unusual")] == [
        "Unusual usage: 1,000 credits in the last hour"]


@time_machine.travel(NOW, tick=False)
def test_steady_usage_does_not_fire(send):
    customer = make_customer(pro_plan(included_credits=Decimal("100000"), runaway_multiplier=Decimal("3"),
                                      runaway_pauses_usage=True), started_at=START)
    steady_day(send, customer)

    send(customer, "100", "this-hour", at=NOW - timedelta(minutes=10))
    send(customer, "150", "a-busy-minute", at=NOW)  # 250 in the hour: 2.5 × the average

    assert check_runaway_usage(customer_id=customer.pk, now=NOW) is None
    assert runaway_alerts() == []
    assert Subscription.objects.get(customer=customer).status == "active"


@time_machine.travel(NOW, tick=False)
def test_tiny_numbers_stay_below_the_floor_which_is_a_setting(send, settings):
    customer = make_customer(pro_plan(runaway_multiplier=Decimal("3")), started_at=START)
    send(customer, "99", "first-use-in-days", at=NOW)  # baseline 0, but under the 100-credit floor

    assert runaway_alerts() == []

    settings.OVERAGE_RUNAWAY_MIN_CREDITS = Decimal("50")
    assert check_runaway_usage(customer_id=customer.pk, now=NOW) is not None


@time_machine.travel(NOW, tick=False)
def test_a_subscription_younger_than_the_baseline_window_is_not_judged(send):
    customer = make_customer(pro_plan(runaway_multiplier=Decimal("3"), runaway_pauses_usage=True),
                             started_at=NOW - timedelta(hours=24), now=NOW)

    send(customer, "5000", "onboarding", at=NOW)

    assert runaway_alerts() == []
    assert Subscription.objects.get(customer=customer).status == "active"


@time_machine.travel(NOW, tick=False)
def test_the_guard_is_off_without_a_multiplier(send):
    customer = make_customer(pro_plan(included_credits=Decimal("100000")), started_at=START)
    steady_day(send, customer, credits_per_hour="1")

    send(customer, "50000", "spike", at=NOW)

    assert check_runaway_usage(customer_id=customer.pk, now=NOW) is None
    assert runaway_alerts() == []
