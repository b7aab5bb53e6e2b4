"""Buying credit packs: granted once, receipted, consumed after included credits, and
(by default) paying down unbilled overage first."""

from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine

from billing.models import BillingPeriod, CreditGrant, CreditPurchase, Invoice
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from billing.services.purchases import complete_purchase, purchase_pack
from plans.models import CreditPack
from tests.factories import FeatureFactory, make_customer, pro_plan, utc
from tests.ledger import assert_ledger_consistent

pytestmark = pytest.mark.django_db
MAY = utc(2026, 5, 1)
MID_MAY = utc(2026, 5, 15)


@pytest.fixture(autouse=True)
def catalogue():
    FeatureFactory(code="api")
    CreditPack.objects.create(code="5k", name="5 000 credits", credits=Decimal("5000"), price=Decimal("10"))
    CreditPack.objects.create(code="short", name="Expiring 1 000", credits=Decimal("1000"), price=Decimal("3"),
                              expires_after_days=7)


def use(customer, credits, at, event_id):
    return record_event(event=EventInput(event_id=event_id, customer=customer.external_id, feature="api",
                                         quantity=Decimal(credits), timestamp=at), now=at)[0]


def test_a_pack_bought_mid_period_is_consumed_after_the_included_credits_and_gets_a_paid_receipt():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase, created = purchase_pack(customer=customer, pack_code="5k", idempotency_key="buy-1", now=MID_MAY)

    use(customer, "12000", utc(2026, 5, 20), "e1")  # 10 000 included first, then 2 000 of the pack

    assert created and purchase.status == "paid"
    receipt = purchase.invoice
    assert (receipt.kind, receipt.status, receipt.total) == ("pack_purchase", "paid", Decimal("10.00"))
    assert [(l.kind, l.credits, l.amount) for l in receipt.lines.all()] == [("pack", Decimal("5000"),
                                                                             Decimal("10.00"))]
    pack_grant = CreditGrant.objects.get(source="purchase")
    assert (pack_grant.remaining, pack_grant.expires_at, pack_grant.cost) == (Decimal("3000"), None, Decimal("10"))
    period = BillingPeriod.objects.get(customer=customer, start=MAY)
    assert period.overage_credits == Decimal("0")
    # The pack is not on the period invoice, and it survives the period.
    invoice = close_period(period_id=period.pk, now=utc(2026, 6, 1, 2))
    assert [l.kind for l in invoice.lines.all()] == ["base_fee"]
    assert CreditGrant.objects.get(pk=pack_grant.pk).remaining == Decimal("3000")
    assert_ledger_consistent()


def test_buying_is_idempotent_by_key():
    customer = make_customer(pro_plan(), started_at=MAY)

    first, _ = purchase_pack(customer=customer, pack_code="5k", idempotency_key="k", now=MID_MAY)
    again, created = purchase_pack(customer=customer, pack_code="5k", idempotency_key="k", now=MID_MAY)

    assert (again.pk, created) == (first.pk, False)
    assert CreditGrant.objects.filter(source="purchase").count() == 1
    assert Invoice.objects.filter(kind="pack_purchase").count() == 1


def test_completing_a_paid_purchase_again_grants_nothing_more():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase, _ = purchase_pack(customer=customer, pack_code="5k", idempotency_key="k", now=MID_MAY)

    for _ in range(3):  # e.g. a payment webhook delivered three times
        complete_purchase(purchase_id=purchase.pk, now=MID_MAY)

    assert CreditGrant.objects.filter(source="purchase").count() == 1
    assert_ledger_consistent()


def test_a_pack_with_an_expiry_expires_after_its_days():
    customer = make_customer(pro_plan(), started_at=MAY)
    purchase_pack(customer=customer, pack_code="short", idempotency_key="k", now=MID_MAY)

    assert CreditGrant.objects.get(source="purchase").expires_at == MID_MAY + timedelta(days=7)


@pytest.mark.parametrize("pays_down, overage_after, june_invoice_total", [
    (True, Decimal("0"), Decimal("49.00")),  # the pack paid down the 3 000 overage credits: nothing more to bill
    (False, Decimal("3000"), Decimal("55.00")),  # the overage stays billable: 3 000 × $0.002 + $49
])
def test_credits_bought_during_overage_pay_it_down_when_the_plan_says_so(pays_down, overage_after,
                                                                         june_invoice_total):
    customer = make_customer(pro_plan(purchases_pay_down_overage=pays_down), started_at=MAY)
    use(customer, "13000", utc(2026, 5, 10), "e1")  # 3 000 overage credits

    purchase_pack(customer=customer, pack_code="5k", idempotency_key="k", now=MID_MAY)

    period = BillingPeriod.objects.get(customer=customer, start=MAY)
    assert period.overage_credits == overage_after
    assert period.credits_used == Decimal("13000")
    pack_grant = CreditGrant.objects.get(source="purchase")
    assert pack_grant.remaining == (Decimal("2000") if pays_down else Decimal("5000"))
    assert close_period(period_id=period.pk, now=utc(2026, 6, 1, 2)).total == june_invoice_total
    assert_ledger_consistent()


def test_packs_api_lists_and_buys(api):
    make_customer(pro_plan(), started_at=MAY, external_id="acme")

    with time_machine.travel(MID_MAY, tick=False):
        packs = api.get("/api/v1/packs").json()
        bought = api.post("/api/v1/customers/acme/packs", {"pack": "5k", "idempotency_key": "k1"}, format="json")
        again = api.post("/api/v1/customers/acme/packs", {"pack": "5k", "idempotency_key": "k1"}, format="json")
        conflict = api.post("/api/v1/customers/acme/packs", {"pack": "short", "idempotency_key": "k1"},
                            format="json")
        unknown = api.post("/api/v1/customers/acme/packs", {"pack": "nope", "idempotency_key": "k2"}, format="json")
        usage = api.get("/api/v1/customers/acme/usage").json()

    assert [p["code"] for p in packs] == ["short", "5k"]
    assert (bought.status_code, again.status_code, conflict.status_code, unknown.status_code) == (201, 200, 409, 422)
    body = bought.json()
    assert (body["status"], body["price"], body["credits"], body["invoice"]) == ("paid", "10.00", "5000", "OVG-000002")
    assert usage["purchased_remaining"] == "5000"
    assert CreditPurchase.objects.count() == 1
