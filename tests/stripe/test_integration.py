"""Overage's services against localstripe through the official SDK: customers, a saved
card, paid packs and top-ups (credits once, on the webhook), the period invoice in
Stripe equal to ours to the cent, and replayed webhooks changing nothing twice."""

from decimal import Decimal

import pytest
import stripe
import time_machine
from django.core import mail
from django.utils import timezone

from billing.models import AutoTopUp, CreditGrant, CreditPurchase, Customer, Invoice, Notification
from billing.services.customers import customer_create
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from billing.services.purchases import auto_topup_configure, credits_remaining, purchase_pack, run_auto_topup
from billing.services.stripe_sync import card_save, card_setup_intent, customer_push, purchase_charge
from plans.models import CreditPack
from tests.factories import FeatureFactory, pro_plan, utc
from tests.stripe.conftest import deliver, stripe_events

pytestmark = pytest.mark.django_db(transaction=True)
MAY = utc(2026, 5, 1)
NOW = utc(2026, 5, 10, 12)


@pytest.fixture(autouse=True)
def clock():
    """Webhooks are handled at 'now': keep it inside the customer's first period."""
    with time_machine.travel(NOW, tick=True):
        yield


@pytest.fixture
def catalogue(db):
    FeatureFactory(code="api")
    pro_plan()
    return CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                                     price=Decimal("12.50"))


def new_customer(external_id="acme") -> Customer:
    customer_create(external_id=external_id, name="Acme Corp", email="ap@acme.test", plan_code="pro",
                    started_at=MAY, now=MAY)  # on commit: mirrored to Stripe (tasks run in-process)
    return Customer.objects.get(external_id=external_id)


def save_card(customer, number="4242424242424242") -> Customer:
    """What Stripe Elements does in the portal: confirm the SetupIntent with a card."""
    intent = card_setup_intent(customer=customer)
    method = stripe.PaymentMethod.create(type="card", card={"number": number, "exp_month": 12, "exp_year": 2030,
                                                             "cvc": "123"})
    stripe.SetupIntent.confirm(intent.id, payment_method=method.id)
    return card_save(customer_id=customer.pk, setup_intent_id=intent.id)


def test_a_new_customer_is_mirrored_to_stripe_once(stripe_mode, catalogue):
    customer = new_customer()

    again = customer_push(customer_id=customer.pk)  # a retried task

    remote = stripe.Customer.retrieve(customer.stripe_customer.id)
    assert (remote.email, remote.metadata["overage_customer"]) == ("ap@acme.test", "acme")
    assert again.stripe_customer_id == customer.stripe_customer_id
    assert len(stripe.Customer.list(limit=100).data) == 1
    assert customer.stripe_customer.email == "ap@acme.test"  # dj-stripe's mirror, linked


def test_saving_a_card_starts_the_base_fee_subscription_and_pays_the_first_invoice(stripe_mode, webhook_endpoint,
                                                                                   catalogue):
    customer = save_card(new_customer())

    subscription = customer.subscriptions.get()
    remote = stripe.Subscription.retrieve(subscription.stripe_subscription_id)
    assert (remote.plan.amount, remote.plan.currency, remote.status) == (4900, "usd", "active")
    first = Invoice.objects.get(customer=customer, kind="subscription_start")
    assert (first.stripe_invoice_id, first.stripe_total) == (remote.latest_invoice, Decimal("49.00"))
    [paid] = stripe_events("invoice.payment_succeeded", id=remote.latest_invoice)
    assert deliver(webhook_endpoint, paid).status_code == 200
    first.refresh_from_db()
    assert (first.status, first.stripe_status) == ("paid", "paid")


def test_buying_a_pack_grants_its_credits_once_on_the_webhook(stripe_mode, webhook_endpoint, catalogue):
    customer = save_card(new_customer())
    assert customer.card_summary == "visa •••• 4242"
    before = credits_remaining(customer, NOW)
    purchase, _ = purchase_pack(customer=customer, pack_code="boost", idempotency_key="k1", now=NOW)

    intent = purchase_charge(purchase_id=purchase.pk, off_session=False)
    assert (intent.status, intent.amount, intent.currency) == ("succeeded", 1250, "usd")
    purchase.refresh_from_db()
    assert purchase.status == "pending" and credits_remaining(customer, NOW) == before  # nothing before the webhook

    [event] = stripe_events("payment_intent.succeeded", id=intent.id)
    answers = [deliver(webhook_endpoint, event).status_code for _ in range(3)]

    assert answers == [200, 200, 200]
    purchase.refresh_from_db()
    assert purchase.status == "paid" and purchase.payment_reference == intent.id
    assert CreditGrant.objects.filter(customer=customer, source="purchase").count() == 1
    assert credits_remaining(customer, timezone.now()) - before == Decimal("5000")


def topup_customer(number="4242424242424242") -> Customer:
    customer = save_card(new_customer(), number)
    auto_topup_configure(customer=customer, enabled=True, pack_code="boost", threshold=Decimal("1000"))
    record_event(event=EventInput(event_id="burn", customer="acme", feature="api", quantity=Decimal("9500"),
                                  timestamp=NOW), now=NOW)  # 500 left: under the threshold, a top-up is bought
    return customer


def test_an_automatic_top_up_is_charged_off_session_and_credited_once(stripe_mode, webhook_endpoint, catalogue):
    customer = topup_customer()
    purchase = CreditPurchase.objects.get(customer=customer, source="auto_topup")
    assert purchase.payment_reference.startswith("pi_")  # charged after commit, off-session
    assert run_auto_topup(customer_id=customer.pk, now=NOW) is None  # awaiting the webhook: no second purchase

    [event] = stripe_events("payment_intent.succeeded", id=purchase.payment_reference)
    for _ in range(3):
        deliver(webhook_endpoint, event)

    purchase.refresh_from_db()
    assert purchase.status == "paid"
    assert CreditGrant.objects.filter(customer=customer, source="auto_topup").count() == 1
    assert credits_remaining(customer, timezone.now()) == Decimal("5500")
    assert stripe.PaymentIntent.retrieve(purchase.payment_reference).amount == 1250


def test_a_failed_top_up_grants_nothing_notifies_and_three_in_a_row_switch_it_off(stripe_mode, webhook_endpoint,
                                                                                  catalogue, settings):
    settings.OVERAGE_TOPUP_MAX_FAILURES = 3
    customer = topup_customer(number="4000000000000341")  # saves fine, every charge is declined
    for attempt in range(1, 4):
        purchase = CreditPurchase.objects.filter(customer=customer, source="auto_topup").latest("pk")
        assert (purchase.status, purchase.failure_reason) == ("failed", "Your card was declined.")
        assert AutoTopUp.objects.get(customer=customer).consecutive_failures == attempt
        run_auto_topup(customer_id=customer.pk, now=timezone.now())  # the next check buys again, until switched off

    topup = AutoTopUp.objects.get(customer=customer)
    assert topup.enabled is False and "3 failed payments" in topup.disabled_reason
    assert CreditPurchase.objects.filter(customer=customer, source="auto_topup").count() == 3
    assert not CreditGrant.objects.filter(customer=customer, source="auto_topup").exists()
    assert credits_remaining(customer, timezone.now()) == Decimal("500")
    notes = list(Notification.objects.filter(customer=customer, title__startswith="Payment failed"))
    assert len(notes) == 3 and "Switched off after 3 failed payments" in notes[0].body
    assert [m.to for m in mail.outbox if m.subject.startswith("Payment failed")] == [["ap@acme.test"]] * 3


def test_the_stripe_invoice_for_a_closed_period_equals_ours_to_the_cent(stripe_mode, webhook_endpoint, catalogue):
    from plans.models import OverageTier, Plan

    plan = Plan.objects.get(code="pro")
    OverageTier.objects.create(plan=plan, up_to=Decimal("1000"), unit_price=Decimal("0.002"))
    OverageTier.objects.create(plan=plan, up_to=None, unit_price=Decimal("0.0015"))
    customer = save_card(new_customer())
    record_event(event=EventInput(event_id="may", customer="acme", feature="api", quantity=Decimal("12345.5"),
                                  timestamp=NOW), now=NOW)
    period = customer.periods.get(start=MAY)

    with time_machine.travel(utc(2026, 6, 1, 2), tick=True):
        ours = close_period(period_id=period.pk, now=timezone.now())  # pushed to Stripe after commit

    ours.refresh_from_db()
    remote = stripe.Invoice.retrieve(ours.stripe_invoice_id)
    # 2 345.5 credits over: 1 000 × 0.002 + 1 345.5 × 0.0015 = 2.00 + 2.01825 → 4.02; + 49.00 for June.
    assert ours.total == Decimal("53.02")
    assert remote.total == 5302 and ours.stripe_total == Decimal("53.02") and not ours.stripe_disagrees
    assert sorted(line.amount for line in remote.lines.data) == [402, 4900]
    assert remote.status == "paid"
    [paid] = stripe_events("invoice.payment_succeeded", id=remote.id)
    deliver(webhook_endpoint, paid)
    ours.refresh_from_db()
    assert (ours.status, ours.stripe_status) == ("paid", "paid")
    assert close_period(period_id=period.pk, now=utc(2026, 6, 1, 3)).pk == ours.pk  # a second close: one invoice
    assert len(stripe.Invoice.list(customer=customer.stripe_customer.id, limit=100).data) == 2  # start + June


def test_a_payment_failure_reported_by_webhook_grants_nothing_and_tells_the_customer_once(stripe_mode,
                                                                                          webhook_endpoint, catalogue):
    """On real Stripe a declined PaymentIntent comes back with the intent, and the purchase
    waits for `payment_intent.payment_failed` (localstripe declines synchronously instead,
    so the intent is created here as `purchase_charge` does, with a card declined on charge)."""
    customer = save_card(new_customer(), "4000000000000341")
    purchase, _ = purchase_pack(customer=customer, pack_code="boost", idempotency_key="k1", now=NOW)
    intent = stripe.PaymentIntent.create(amount=1250, currency="usd", customer=customer.stripe_customer.id,
                                         payment_method=customer.stripe_payment_method_id,
                                         payment_method_types=["card"], metadata={"overage_purchase": str(purchase.pk)})
    with pytest.raises(stripe.CardError):
        stripe.PaymentIntent.confirm(intent.id)
    [failed] = stripe_events("payment_intent.payment_failed", id=intent.id)

    answers = [deliver(webhook_endpoint, failed).status_code for _ in range(3)]

    assert answers == [200, 200, 200]
    purchase.refresh_from_db()
    assert (purchase.status, purchase.payment_reference) == ("failed", intent.id)
    assert purchase.failure_reason == failed["data"]["object"]["last_payment_error"]["message"]
    assert not CreditGrant.objects.filter(customer=customer, source="purchase").exists()
    [note] = Notification.objects.filter(customer=customer, title="Payment failed: Boost")
    assert note.body == f"Your purchase of Boost was not paid: {purchase.failure_reason} No credits were added."
    assert [m.to for m in mail.outbox if m.subject == "Payment failed: Boost"] == [["ap@acme.test"]]
