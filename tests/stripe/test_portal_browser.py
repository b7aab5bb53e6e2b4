"""Buying a pack in the portal through Stripe: the card is entered in Stripe Elements
(localstripe's stand-in for Stripe.js), saved with a SetupIntent, the pack is charged
with a PaymentIntent, and the credits appear when localstripe delivers the
`payment_intent.succeeded` webhook to the live server: no reload by the customer."""

from datetime import timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CreditPurchase, CustomerMember
from billing.services.customers import customer_create
from billing.services.stripe_sync import webhook_endpoint_ensure
from plans.models import CreditPack
from tests.browser import BROWSER_TEST, SCREENSHOTS, browser, log_in  # noqa: F401 - browser is a fixture
from tests.factories import FeatureFactory, pro_plan

pytestmark = BROWSER_TEST


def test_the_customer_saves_a_card_in_elements_and_buys_a_pack(browser, live_server, stripe_mode):
    webhook_endpoint_ensure(base_url=live_server.url)  # localstripe now delivers to the live server
    FeatureFactory(code="api")
    pro_plan()
    CreditPack.objects.create(code="boost", name="Boost", currency="USD", credits=Decimal("5000"),
                              price=Decimal("12.50"))
    started = timezone.now() - timedelta(days=3)
    customer = customer_create(external_id="acme", name="Acme Corp", email="ap@acme.test", plan_code="pro",
                               started_at=started, now=timezone.now())
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    log_in(page, live_server, "/portal/credits/", then="#balance")
    assert page.text_content("#balance").strip() == "10,000"

    for field, value in (("number", "4242424242424242"), ("exp_month", "12"), ("exp_year", "30"),
                         ("cvc", "123"), ("postal_code", "10001")):
        page.fill(f"#card-element input[placeholder={field}]", value)
    page.click("#save-card")
    page.wait_for_selector("#card-summary")
    assert page.text_content("#card-summary").strip() == "visa •••• 4242"

    page.click("#pack-boost button[type=submit]")
    assert "awaiting payment" in page.text_content("body")
    page.wait_for_function("document.querySelector('#balance').textContent.trim() === '15,000'", timeout=20_000)

    purchase = CreditPurchase.objects.get(customer=customer)
    assert purchase.status == "paid" and purchase.payment_reference.startswith("pi_")
    page.screenshot(path=str(SCREENSHOTS / "buy-credits-stripe.png"), full_page=True)
