"""The dashboard and the usage page cost the same for ten events or ten million: they read
rollups, cached period totals and grants, and of the raw tables only a page of events
(by keyset) and a handful of grant-level ledger entries, never a sum over every event or
every usage entry of a period."""

import re
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext

from billing.models import BillingPeriod, CreditGrant, CustomerMember, LedgerEntry
from billing.selectors import _credits_drawn_beyond_included
from billing.services.invoicing import close_period
from billing.services.ledger import grant_credits_once
from billing.services.metering import EventInput, record_events
from billing.services.plan_changes import subscription_change_plan
from billing.services.purchases import purchase_pack
from plans.models import CreditPack
from tests.factories import FeatureFactory, PlanFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 20)


def use(customer, at, credits, prefix, n=2):
    """`n` api events of `credits` / n credits each at `at` (the api costs 1 credit a unit)."""
    record_events(events=[EventInput(event_id=f"{prefix}-{i}", customer=customer.external_id, feature="api",
                                     quantity=Decimal(credits) / n, timestamp=at) for i in range(n)], now=at)


def drawn_from_entries(period) -> Decimal:
    """The definition: the period's consume entries on grants other than its included ones."""
    total = (LedgerEntry.objects.filter(period=period, kind=LedgerEntry.Kind.CONSUME)
             .exclude(grant__source=CreditGrant.Source.PLAN_ALLOCATION).aggregate(total=Sum("credits"))["total"])
    return -(total or Decimal(0))


@pytest.fixture
def busy_customer(client):
    """Pro with a capped rollover (2 000): April leaves 1 000 included credits unused,
    which roll over into May; May draws its rollover, included and promotional credits,
    goes into overage, buys a pack that pays the overage down, upgrades mid-period
    (prorated included credits) and uses more."""
    FeatureFactory(code="api")
    pro = pro_plan(rollover_policy="capped", rollover_max_credits=Decimal("2000"))
    PlanFactory(code="big", name="Big", base_price=Decimal("199"), included_credits=Decimal("40000"),
                overage_enabled=True, overage_unit_price=Decimal("0.001"))
    CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                              price=Decimal("10"))
    customer = make_customer(pro, started_at=utc(2026, 4, 1), external_id="acme")
    use(customer, utc(2026, 4, 10), 9000, "apr")
    april = BillingPeriod.objects.get(customer=customer, start=utc(2026, 4, 1))
    close_period(period_id=april.pk, now=utc(2026, 5, 1, 2))
    grant_credits_once(customer=customer, idempotency_key="promo", credits=Decimal("500"), source="promotional",
                       now=utc(2026, 5, 2), expires_at=utc(2026, 6, 30))
    use(customer, utc(2026, 5, 5), 13000, "may-a")  # 1 000 rolled over + 10 000 included + 500 promo + 1 500 over
    purchase_pack(customer=customer, pack_code="boost", idempotency_key="boost-1", now=utc(2026, 5, 6))
    use(customer, utc(2026, 5, 8), 4000, "may-b")  # the pack's 3 500 left, then 500 over
    subscription_change_plan(customer=customer, plan_code="big", now=utc(2026, 5, 10))
    use(customer, utc(2026, 5, 12), 6000, "may-c")  # from the upgrade's prorated included credits
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


@time_machine.travel(NOW, tick=False)
def test_credits_drawn_beyond_included_from_period_totals_equal_the_ledger_entries(busy_customer):
    april, may = BillingPeriod.objects.filter(customer=busy_customer).order_by("start")

    # April: all from its included grant (1 000 of what was left rolled over, the rest expired).
    assert drawn_from_entries(april) == _credits_drawn_beyond_included(april) == Decimal(0)
    # May: 1 000 rolled over + 500 promotional + 5 000 from the pack (1 500 of it paying overage down).
    assert drawn_from_entries(may) == Decimal(6500)
    assert _credits_drawn_beyond_included(may) == Decimal(6500)


def touching(queries, table: str) -> list[str]:
    return [q["sql"] for q in queries if f'"{table}"' in q["sql"]]


@time_machine.travel(NOW, tick=False)
def test_the_dashboard_reads_no_usage_ledger_entry_and_no_raw_event(client, busy_customer):
    for headers in ({}, {"HX-Request": "true"}):
        with CaptureQueriesContext(connection) as queries:
            page = client.get("/portal/", headers=headers)
        assert page.status_code == 200

        assert touching(queries.captured_queries, "billing_usageevent") == []
        # Only the expiry and rollover entries of the included grants (a few per period).
        entries = touching(queries.captured_queries, "billing_ledgerentry")
        assert entries and all(re.search(r"\"kind\" IN \('expire', 'rollover'\)", sql) for sql in entries), entries


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("url", ["/portal/usage/", "/portal/usage/?feature=api&from=2026-05-06&to=2026-05-12",
                                 "/portal/usage/?after=1778112000000000_999999",
                                 "/portal/usage/?before=1777593600000000_1"])
def test_the_usage_page_reads_raw_events_a_page_at_a_time(client, busy_customer, url):
    for headers in ({}, {"HX-Request": "true"}):
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url, headers=headers)
        assert page.status_code == 200

        assert touching(queries.captured_queries, "billing_ledgerentry") == []
        for sql in touching(queries.captured_queries, "billing_usageevent"):
            # A page (one row more than shown), an EXISTS probe, or the count of rejected
            # events (their own partial index).
            assert re.search(r"LIMIT (51|1)\b", sql) or "'rejected'" in sql, sql
