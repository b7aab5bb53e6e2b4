"""`manage.py stripe_resync CUSTOMER`: after missed webhooks or a card changed in
Stripe's dashboard, Overage re-reads the customer and its invoices from Stripe and
names every invoice whose Stripe total differs from ours (exit status 1)."""

from decimal import Decimal
from io import StringIO

import pytest
import stripe
import time_machine
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing.models import Customer, Invoice
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from tests.factories import utc
from tests.stripe.test_integration import MAY, NOW, catalogue, clock, new_customer, save_card  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


def resync(external_id="acme") -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("stripe_resync", external_id, stdout=out)
    except SystemExit as exit_:
        return exit_.code, out.getvalue()
    return 0, out.getvalue()


@pytest.fixture
def closed_may(stripe_mode, catalogue):  # noqa: F811
    customer = save_card(new_customer())
    record_event(event=EventInput(event_id="may", customer="acme", feature="api", quantity=Decimal("12000"),
                                  timestamp=NOW), now=NOW)
    with time_machine.travel(utc(2026, 6, 1, 2), tick=True):
        invoice = close_period(period_id=customer.periods.get(start=MAY).pk, now=timezone.now())
    invoice.refresh_from_db()
    assert (invoice.total, invoice.status, invoice.stripe_status) == (Decimal("53.00"), "paid", "paid")
    return Customer.objects.get(pk=customer.pk), invoice


def test_resync_restores_what_missed_webhooks_left_stale(closed_may):
    customer, invoice = closed_may
    # As if Overage had never heard back: Stripe status unknown, ours still issued.
    Invoice.objects.filter(pk=invoice.pk).update(status="issued", paid_at=None, stripe_status="open",
                                                 stripe_total=None)
    # The customer replaced the card in Stripe's dashboard.
    method = stripe.PaymentMethod.create(type="card", card={"number": "4000056655665556", "exp_month": 1,
                                                             "exp_year": 2031, "cvc": "123"})
    stripe.PaymentMethod.attach(method.id, customer=customer.stripe_customer.id)
    stripe.Customer.modify(customer.stripe_customer.id, invoice_settings={"default_payment_method": method.id})

    code, output = resync()

    invoice.refresh_from_db()
    customer.refresh_from_db()
    assert code == 0
    assert f"{invoice.number}: ours USD 53.00, Stripe USD 53.00 (paid) ok" in output
    assert output.endswith("invoice(s) re-read, 0 disagree.\n")
    assert (invoice.status, invoice.stripe_status, invoice.stripe_total) == ("paid", "paid", Decimal("53.00"))
    assert (customer.stripe_payment_method_id, customer.card_summary) == (method.id, "visa •••• 5556")
    assert resync() == (code, output)  # a second run changes nothing


def test_resync_names_an_invoice_stripe_bills_differently_and_exits_1(closed_may):
    customer, invoice = closed_may
    Invoice.objects.filter(pk=invoice.pk).update(total=Decimal("54.00"))  # ours drifted from Stripe's

    code, output = resync()

    assert code == 1
    assert f"{invoice.number}: ours USD 54.00, Stripe USD 53.00 (paid) DISAGREES" in output
    assert output.endswith("1 disagree.\n")
    assert Invoice.objects.get(pk=invoice.pk).stripe_disagrees


def test_resync_refuses_unknown_customers_and_local_mode(closed_may, settings):
    with pytest.raises(CommandError, match="No customer with external_id 'nobody'"):
        call_command("stripe_resync", "nobody")
    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(CommandError, match="STRIPE_SECRET_KEY is not set"):
        call_command("stripe_resync", "acme")
