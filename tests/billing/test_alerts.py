"""Usage alerts fired by ingestion: thresholds of included credits, overage started, spend
cap reached; once per period each; notification, email."""

from decimal import Decimal

import pytest
import time_machine

from billing.models import Alert, AlertPreference, BillingPeriod, Notification
from billing.services.alerts import check_usage_alerts, included_credits_used
from billing.services.metering import EventInput, record_event, record_events
from tests.factories import FeatureFactory, free_plan, make_customer, payg_plan, pro_plan, utc

pytestmark = pytest.mark.django_db
START = utc(2026, 3, 1)
NOW = utc(2026, 3, 15, 12)


@pytest.fixture
def send(django_capture_on_commit_callbacks):
    """Record one event as the API does, running what it queues on commit (the alert
    checks, then their emails) in-process, as the embedded mode does."""
    FeatureFactory(code="api-call")

    def send(customer, credits, event_id, *, now=NOW):
        with django_capture_on_commit_callbacks(execute=True):
            return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api-call",
                                                 quantity=Decimal(credits), timestamp=now), now=now)[0]
    return send


def fired(customer):
    return sorted((a.kind, a.threshold) for a in Alert.objects.filter(customer=customer))


@time_machine.travel(NOW, tick=False)
def test_crossing_50_and_80_percent_in_one_event_fires_both_once(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)

    send(customer, "8000", "e1")

    assert fired(customer) == [("usage_threshold", 50), ("usage_threshold", 80)]
    eighty = Alert.objects.get(customer=customer, threshold=80)
    assert eighty.period == BillingPeriod.objects.get(customer=customer)
    assert eighty.fired_at == NOW
    assert eighty.details == {
        "included_credits": "10000", "included_credits_used": "8000", "percent_used": "80", "credits_used": "8000",
        "overage_credits": "0", "estimated_overage_amount": "0.00", "currency": "USD", "spend_cap": None,
        "plan": "pro", "threshold": 80,
    }
    assert sorted(m.subject for m in mailoutbox) == ["You have used 50% of your included credits",
                                                     "You have used 80% of your included credits"]
    assert Notification.objects.filter(customer=customer).count() == 2


@time_machine.travel(NOW, tick=False)
def test_more_usage_above_a_fired_threshold_fires_nothing_new(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)
    send(customer, "8000", "e1")

    send(customer, "500", "e2")  # 85 %
    send(customer, "1", "e3")
    # A check run again directly (a retried task, a second worker) finds nothing to do.
    period = BillingPeriod.objects.get(customer=customer)
    assert check_usage_alerts(customer_id=customer.pk, period_id=period.pk, now=NOW) == []

    assert fired(customer) == [("usage_threshold", 50), ("usage_threshold", 80)]
    assert len(mailoutbox) == 2
    assert Notification.objects.count() == 2


@time_machine.travel(NOW, tick=False)
def test_a_new_period_fires_its_thresholds_again(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)
    send(customer, "6000", "march")

    april = utc(2026, 4, 10)
    with time_machine.travel(april, tick=False):
        send(customer, "6000", "april", now=april)

    march_period, april_period = BillingPeriod.objects.filter(customer=customer).order_by("start")
    assert [(a.period, a.threshold) for a in Alert.objects.order_by("fired_at")] == [
        (march_period, 50), (april_period, 50)]
    assert len(mailoutbox) == 2


@time_machine.travel(NOW, tick=False)
def test_custom_thresholds_replace_the_defaults(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)
    AlertPreference.objects.create(customer=customer, thresholds=[25, 90])

    send(customer, "3000", "e1")  # 30 %
    assert fired(customer) == [("usage_threshold", 25)]

    send(customer, "5999", "e2")  # 89.99 %: not yet 90
    assert fired(customer) == [("usage_threshold", 25)]

    send(customer, "1", "e3")  # exactly 90 %
    assert fired(customer) == [("usage_threshold", 25), ("usage_threshold", 90)]
    assert [m.subject for m in mailoutbox] == ["You have used 25% of your included credits",
                                               "You have used 90% of your included credits"]


@time_machine.travel(NOW, tick=False)
def test_overage_started_fires_once_with_the_estimated_overage_money(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)

    send(customer, "10500", "e1")
    send(customer, "100", "e2")

    assert fired(customer) == [("overage_started", 0), ("usage_threshold", 50), ("usage_threshold", 80),
                               ("usage_threshold", 100)]
    overage = Alert.objects.get(kind="overage_started")
    # 500 overage credits × $0.002 = $1.00 when it fired.
    assert (overage.details["overage_credits"], overage.details["estimated_overage_amount"]) == ("500", "1.00")
    [email] = [m for m in mailoutbox if m.subject == "Your usage is now in overage"]
    assert email.to == ["billing@acme.test"]
    assert email.from_email == "billing@overage.localhost"
    assert "Further usage is billed as overage at your plan's rates." in email.body
    assert "Included credits used: 10,000 of 10,000" in email.body
    assert "Credits used this period: 10,500" in email.body
    assert "Overage credits: 500" in email.body
    assert "Estimated overage charges so far: USD 1.00" in email.body


@time_machine.travel(NOW, tick=False)
def test_a_plan_without_included_credits_has_no_thresholds_but_reports_overage(send):
    customer = make_customer(payg_plan(), started_at=START)

    send(customer, "1234567", "e1")

    assert fired(customer) == [("overage_started", 0)]
    # 1 234 567 × $0.001 = $1 234.567 → $1 234.57, rounded once by the pricing function.
    assert Alert.objects.get().details["estimated_overage_amount"] == "1234.57"


@time_machine.travel(NOW, tick=False)
def test_cap_reached_fires_after_an_event_refused_at_the_spend_cap(send, mailoutbox):
    customer = make_customer(pro_plan(overage_cap=Decimal("1.00")), started_at=START)
    send(customer, "10500", "fills-the-cap")  # $1.00 of overage: at the cap, not over it
    assert ("cap_reached", 0) not in fired(customer)

    refused = send(customer, "1", "over-the-cap")
    send(customer, "1", "refused-again")

    assert (refused.status, refused.reject_reason) == ("rejected", "spend_cap_reached")
    cap = Alert.objects.get(kind="cap_reached")
    assert (cap.details["event_id"], cap.details["spend_cap"]) == ("over-the-cap", "1.0000")
    [email] = [m for m in mailoutbox if m.subject == "Your spend cap has been reached"]
    assert "Spend cap for this period: USD 1.00" in email.body
    assert Notification.objects.filter(alert=cap).count() == 1


@time_machine.travel(NOW, tick=False)
def test_an_event_refused_for_lack_of_credits_is_not_a_cap_alert(send):
    customer = make_customer(free_plan(), started_at=START)
    send(customer, "1000", "e1")

    refused = send(customer, "1", "e2")

    assert refused.reject_reason == "insufficient_credits"
    assert fired(customer) == [("usage_threshold", 50), ("usage_threshold", 80), ("usage_threshold", 100)]


@time_machine.travel(NOW, tick=False)
def test_no_email_when_the_customer_turned_that_kind_off_but_the_notification_stays(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)
    AlertPreference.objects.create(customer=customer, email_enabled={"usage_threshold": False})

    send(customer, "10001", "e1")

    assert fired(customer) == [("overage_started", 0), ("usage_threshold", 50), ("usage_threshold", 80),
                               ("usage_threshold", 100)]
    assert [m.subject for m in mailoutbox] == ["Your usage is now in overage"]
    assert Notification.objects.filter(customer=customer).count() == 4


@time_machine.travel(NOW, tick=False)
def test_no_email_for_a_customer_without_an_address(send, mailoutbox):
    customer = make_customer(pro_plan(), started_at=START)
    customer.email = ""
    customer.save()

    send(customer, "5000", "e1")

    assert fired(customer) == [("usage_threshold", 50)]
    assert mailoutbox == []


@time_machine.travel(NOW, tick=False)
def test_the_notification_tells_the_numbers(send):
    customer = make_customer(pro_plan(), started_at=START)

    send(customer, "8250", "e1")

    notification = Notification.objects.get(alert__threshold=80)
    assert notification.customer == customer
    assert notification.created_at == NOW
    assert notification.read_at is None
    assert notification.title == "You have used 80% of your included credits"
    assert notification.body == (
        "Usage has drawn 8,250 of the 10,000 credits included in your plan for this billing period (82.5%).\n\n"
        "Billing period: 2026-03-01 00:00 to 2026-04-01 00:00 UTC\n"
        "Included credits used: 8,250 of 10,000\n"
        "Credits used this period: 8,250\n"
        "Overage credits: 0\n"
        "Estimated overage charges so far: USD 0.00"
    )


@time_machine.travel(NOW, tick=False)
def test_a_batch_checks_each_period_it_touched(django_capture_on_commit_callbacks):
    """A late event for the previous period (inside its grace hour) and one for the
    current period, in one batch: both periods get their alerts."""
    FeatureFactory(code="api-call")
    customer = make_customer(pro_plan(), started_at=utc(2026, 2, 1), now=utc(2026, 2, 1))
    now = utc(2026, 3, 1, 0, 30)
    with time_machine.travel(now, tick=False), django_capture_on_commit_callbacks(execute=True):
        record_events(events=[
            EventInput(event_id="late", customer=customer.external_id, feature="api-call", quantity=Decimal("5000"),
                       timestamp=utc(2026, 2, 28, 23, 59)),
            EventInput(event_id="new", customer=customer.external_id, feature="api-call", quantity=Decimal("9000"),
                       timestamp=now),
        ], now=now)

    february, march = BillingPeriod.objects.filter(customer=customer).order_by("start")
    assert sorted((a.period_id, a.threshold) for a in Alert.objects.all()) == sorted(
        [(february.pk, 50), (march.pk, 50), (march.pk, 80)])


@time_machine.travel(NOW, tick=False)
def test_thresholds_count_only_usage_not_expiry_at_close(send):
    """After the close expires the unused included credits, a late check of the closed
    period fires nothing: expiry is not usage, and a closed period is done."""
    from billing.services.invoicing import close_period

    customer = make_customer(pro_plan(), started_at=START)
    send(customer, "1000", "e1")  # 10 %
    march = BillingPeriod.objects.get(customer=customer)
    after_close = utc(2026, 4, 1, 2)
    with time_machine.travel(after_close, tick=False):
        close_period(period_id=march.pk, now=after_close)
        march.refresh_from_db()
        assert included_credits_used(march) == (Decimal("10000"), Decimal("1000"))
        assert check_usage_alerts(customer_id=customer.pk, period_id=march.pk, now=after_close) == []
    assert fired(customer) == []
