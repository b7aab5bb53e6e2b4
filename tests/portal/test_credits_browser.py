"""Buying credits in a real browser (Debian's Chromium driven by Playwright) against a
live server: buy a pack, see the dashboard balance grow; screenshots for the docs."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import BillingPeriod, CustomerMember
from billing.services.invoicing import close_period
from billing.services.metering import EventInput, record_event
from plans.models import CreditPack
from tests.browser import BROWSER_TEST, SCREENSHOTS, browser, log_in  # noqa: F401 - browser is a fixture
from tests.factories import FeatureFactory, make_customer, pro_plan

pytestmark = BROWSER_TEST


@pytest.fixture
def acme():
    """On Pro for 40 days: the first period (12 500 credits, 2 500 of them overage) is
    closed and invoiced; the current one has its 10 000 included credits untouched."""
    FeatureFactory(code="api")
    FeatureFactory(code="images")
    started = timezone.now() - timedelta(days=40)
    customer = make_customer(pro_plan(), started_at=started, external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    for n, (feature, credits) in enumerate((("api", "9000"), ("images", "2000"), ("api", "1500")), start=1):
        at = started + timedelta(days=5 * n)
        record_event(event=EventInput(event_id=f"e{n}", customer="acme", feature=feature, quantity=Decimal(credits),
                                      timestamp=at), now=at)
    first = BillingPeriod.objects.filter(customer=customer).order_by("start").first()
    close_period(period_id=first.pk, now=timezone.now(), skip_grace=True)
    CreditPack.objects.create(code="starter", name="Starter pack", credits=Decimal("5000"), price=Decimal("10"))
    CreditPack.objects.create(code="scale", name="Scale pack", credits=Decimal("50000"), price=Decimal("80"))
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    return customer


def test_buying_a_pack_grows_the_balance_on_the_dashboard(browser, live_server, acme):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    log_in(page, live_server)
    assert page.text_content("#credits-remaining").strip() == "10,000"

    page.goto(f"{live_server.url}/portal/credits/")
    page.click("#pack-starter button[type=submit]")

    page.wait_for_selector(".flash")
    assert "You now have 15,000 credits." in page.text_content(".flash")
    assert page.text_content("#balance").strip() == "15,000"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "buy-credits.png"), full_page=True)

    page.goto(f"{live_server.url}/portal/")
    assert page.text_content("#credits-remaining").strip() == "15,000"
    assert page.text_content("#purchased-remaining").strip() == "5,000"

    page.goto(f"{live_server.url}/portal/invoices/")
    page.click("tbody tr:has-text('Period close') a")
    page.wait_for_selector("#invoice-total")
    assert page.text_content("#invoice-total").strip() == "USD 54.00"
    page.screenshot(path=str(SCREENSHOTS / "invoice.png"), full_page=True)
