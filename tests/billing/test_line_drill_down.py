"""The usage behind an overage line: a line that bills its whole period is broken down
from the period's rollups, a progressive-billing band from the ledger; either way the
features, days and events add up to exactly what the line billed."""

from decimal import Decimal as D

import pytest

from billing.models import BillingPeriod, InvoiceLine
from billing.selectors import overage_line_usage
from billing.services.invoicing import bill_progressively, close_period
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)


def use(external_id, credits, at, event_id, feature="api"):
    record_event(event=EventInput(event_id=event_id, customer=external_id, feature=feature, quantity=D(credits),
                                  timestamp=at), now=at)


@pytest.fixture
def features():
    FeatureFactory(code="api")
    FeatureFactory(code="images")


def overage_line(invoice):
    return invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)


def test_a_whole_period_line_is_broken_down_by_feature_day_and_event(features):
    customer = make_customer(pro_plan(), started_at=MAY, external_id="acme")
    use("acme", "9000", utc(2026, 5, 3, 9), "a")            # within the 10 000 included
    use("acme", "2000", utc(2026, 5, 3, 23, 59), "b", "images")  # 1 000 over
    use("acme", "500", utc(2026, 5, 4), "c")                 # all over
    use("acme", "250", utc(2026, 5, 4, 1), "d", "images")    # all over
    use("acme", "4", utc(2026, 5, 30), "e")                  # all over
    line = overage_line(close_period(period_id=BillingPeriod.objects.get(customer=customer).pk,
                                     now=utc(2026, 6, 2)))

    usage = overage_line_usage(line)

    assert line.credits == D("1754")
    assert usage.by_feature == [{"feature": "api", "overage_credits": D("504"), "events": 2},
                                {"feature": "images", "overage_credits": D("1250"), "events": 2}]
    assert [(row["day"].isoformat(), row["overage_credits"]) for row in usage.by_day] == [
        ("2026-05-03", D("1000")), ("2026-05-04", D("750")), ("2026-05-30", D("4"))]
    assert [(entry.event.event_id, -entry.credits) for entry in usage.entries] == [
        ("b", D("1000")), ("c", D("500")), ("d", D("250")), ("e", D("4"))]
    assert usage.event_count == 4 and usage.paid_down == D("0")


def test_progressive_bands_split_the_period_at_the_billed_entry(features):
    customer = make_customer(pro_plan(progressive_billing_threshold=D("5")), started_at=MAY, external_id="acme")
    period_id = BillingPeriod.objects.get(customer=customer).pk
    use("acme", "13000", utc(2026, 5, 10), "e1")             # 3 000 over: $6.00, over the threshold
    first = overage_line(bill_progressively(period_id=period_id, now=utc(2026, 5, 10, 1)))
    use("acme", "700", utc(2026, 5, 20), "e2", "images")
    use("acme", "534.5", utc(2026, 5, 21), "e3")
    last = overage_line(close_period(period_id=period_id, now=utc(2026, 6, 2)))

    early, late = overage_line_usage(first), overage_line_usage(last)

    assert early.by_feature == [{"feature": "api", "overage_credits": D("3000"), "events": 1}]
    assert [entry.event.event_id for entry in early.entries] == ["e1"]
    assert late.by_feature == [{"feature": "api", "overage_credits": D("534.5"), "events": 1},
                               {"feature": "images", "overage_credits": D("700"), "events": 1}]
    assert [(row["day"].isoformat(), row["overage_credits"]) for row in late.by_day] == [
        ("2026-05-20", D("700")), ("2026-05-21", D("534.5"))]
    assert [entry.event.event_id for entry in late.entries] == ["e2", "e3"]
    assert (first.credits, last.credits) == (D("3000"), D("1234.5"))
