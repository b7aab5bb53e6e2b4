"""Invoices in the portal: the list and one invoice with exact figures for a closed
month, the usage behind an overage line, and nobody else's invoices."""

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from billing.models import BillingPeriod, CustomerMember, Invoice, InvoiceLine
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from tests.factories import FeatureFactory, make_customer, pro_plan, set_tiers, utc

pytestmark = pytest.mark.django_db
CLOSED_AT = utc(2026, 6, 2)


def login_as(client, customer, email):
    user = get_user_model().objects.create_user(email, email, "pw")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)


@pytest.fixture
def may_invoice(client):
    """Acme on Pro in May 2026: 12 500 credits (2 000 of them on `images`), so 2 500 credits
    of overage at $0.002 = $5.00 on top of the $49 base fee; the period is closed."""
    FeatureFactory(code="api")
    FeatureFactory(code="images")
    customer = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    for event_id, day, feature, credits in (("e1", 5, "api", "4000"), ("e2", 10, "api", "5000"),
                                            ("e3", 20, "images", "2000"), ("e4", 25, "api", "1500")):
        at = utc(2026, 5, day, 12)
        record_event(event=EventInput(event_id=event_id, customer="acme", feature=feature,
                                      quantity=Decimal(credits), timestamp=at), now=at)
    period = BillingPeriod.objects.get(customer=customer, start=utc(2026, 5, 1))
    invoice = close_period(period_id=period.pk, now=CLOSED_AT)
    login_as(client, customer, "ap@acme.test")
    return invoice


def test_the_list_shows_each_invoice_with_its_exact_total(client, may_invoice):
    page = client.get("/portal/invoices/").content.decode()

    assert f'<a href="/portal/invoices/{may_invoice.number}/">{may_invoice.number}</a>' in page
    assert "May 1 – Jun 1, 2026" in page
    assert page.count('<td class="num">USD 54.00</td>') == 1  # $49 next month's fee + $5 overage
    assert page.count('<td class="num">USD 49.00</td>') == 1  # the subscription start invoice


def test_the_invoice_shows_every_line_and_the_total(client, may_invoice):
    overage = may_invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)

    page = client.get(f"/portal/invoices/{may_invoice.number}/").content.decode()

    assert f"<h1>Invoice {may_invoice.number}</h1>" in page
    assert '<span class="status status-issued" id="invoice-status">Issued</span>' in page
    assert '<dd id="invoice-issued">Jun 2, 2026</dd>' in page
    assert '<dd id="invoice-period">May 1, 2026 – Jun 1, 2026</dd>' in page
    assert "Overage: 2,500 credits" in page and "Pro base fee" in page
    assert ('<td class="num">2,500</td>\n        <td class="num">USD 0.002</td>\n'
            '        <td class="num">USD 5.00</td>') in page
    assert '<td class="num">USD 49.00</td>' in page
    assert '<th class="num" id="invoice-total">USD 54.00</th>' in page
    assert f'href="/portal/invoices/{may_invoice.number}/lines/{overage.pk}/"' in page
    assert 'onclick="window.print()"' in page and "portal/invoices.css" in page


def test_a_tiered_overage_line_shows_its_tiers(client, db):
    FeatureFactory(code="api")
    plan = set_tiers(pro_plan(), ("1000", "0.002"), (None, "0.001"))
    customer = make_customer(plan, started_at=utc(2026, 5, 1), external_id="tiered")
    at = utc(2026, 5, 10)
    record_event(event=EventInput(event_id="big", customer="tiered", feature="api", quantity=Decimal("12500"),
                                  timestamp=at), now=at)
    invoice = close_period(period_id=BillingPeriod.objects.get(customer=customer, start=at.replace(day=1)).pk,
                           now=CLOSED_AT)
    login_as(client, customer, "t@tiered.test")

    page = client.get(f"/portal/invoices/{invoice.number}/").content.decode()

    # 1 000 credits at $0.002 + 1 500 at $0.001 = $3.50; with the $49 fee, $52.50.
    assert "tiered, see below" in page
    assert '<td class="num">1,000</td>\n        <td class="num">USD 0.002</td>\n        <td class="num">USD 2.00</td>' in page
    assert '<td class="num">1,500</td>\n        <td class="num">USD 0.001</td>\n        <td class="num">USD 1.50</td>' in page
    assert '<th class="num" id="invoice-total">USD 52.50</th>' in page


def test_an_overage_line_drills_down_to_the_usage_behind_it(client, may_invoice):
    overage = may_invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)

    page = client.get(f"/portal/invoices/{may_invoice.number}/lines/{overage.pk}/").content.decode()

    assert '<dd id="line-credits">2,500</dd>' in page and '<dd id="line-amount">USD 5.00</dd>' in page
    # Included credits ran out during e3 (10 000 used by then: 1 000 of its 2 000 are overage).
    assert '<tr><td>api</td><td class="num">1</td><td class="num">1,500</td></tr>' in page
    assert '<tr><td>images</td><td class="num">1</td><td class="num">1,000</td></tr>' in page
    assert '<tr><td>May 20, 2026</td><td class="num">1,000</td></tr>' in page
    assert '<tr><td>May 25, 2026</td><td class="num">1,500</td></tr>' in page
    assert "<td>e3</td>" in page and "<td>e4</td>" in page and "<td>e1</td>" not in page


def test_a_base_fee_line_has_no_drill_down(client, may_invoice):
    base = may_invoice.lines.get(kind=InvoiceLine.Kind.BASE_FEE)

    assert client.get(f"/portal/invoices/{may_invoice.number}/lines/{base.pk}/").status_code == 404


def test_another_customers_invoice_and_lines_are_not_found(client, may_invoice, django_user_model):
    overage = may_invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)
    other = make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    login_as(client, other, "b@globex.test")
    own = Invoice.objects.get(customer=other)

    assert client.get(f"/portal/invoices/{may_invoice.number}/").status_code == 404
    assert client.get(f"/portal/invoices/{may_invoice.number}/lines/{overage.pk}/").status_code == 404
    # Their own invoice number with Acme's line id is not a way in either.
    assert client.get(f"/portal/invoices/{own.number}/lines/{overage.pk}/").status_code == 404
    listing = client.get("/portal/invoices/").content.decode()
    assert own.number in listing and may_invoice.number not in listing


def test_invoices_need_a_login(client):
    response = client.get("/portal/invoices/")

    assert response.status_code == 302 and response["Location"].startswith("/portal/login/")
