"""The portal in a real browser (Debian's Chromium driven by Playwright) against a live
server: what a customer does and sees."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CustomerMember
from billing.services.api_keys import api_key_create
from tests.browser import BROWSER_TEST, SCREENSHOTS, browser, log_in  # noqa: F401 - browser is a fixture
from tests.factories import FeatureFactory, make_customer, pro_plan

pytestmark = BROWSER_TEST


@pytest.fixture
def acme():
    FeatureFactory(code="gpt-4o", default_credits_per_unit=Decimal("10"))
    started = timezone.now() - timedelta(days=3)
    customer = make_customer(pro_plan(overage_cap=Decimal("20")), started_at=started, external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    return customer


def test_an_event_sent_through_the_api_shows_on_the_dashboard_without_a_reload(browser, live_server, acme):
    _, key = api_key_create(name="browser-test")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    log_in(page, live_server)
    assert page.text_content("#credits-used").strip() == "0"
    page.evaluate("window.__sameDocument = true")  # survives only if the page never reloads

    response = page.request.post(f"{live_server.url}/api/v1/events",
                                 headers={"Authorization": f"Bearer {key}"},
                                 data={"id": "live-1", "customer": "acme", "feature": "gpt-4o", "quantity": 1234})
    assert response.status == 201

    page.wait_for_function("document.querySelector('#credits-used').textContent.trim() === '12,340'",
                           timeout=10_000)
    assert page.text_content("#overage-credits").strip() == "2,340"
    assert page.text_content("#estimated-overage").strip() == "USD 4.68"
    assert page.evaluate("window.__sameDocument") is True
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)


def test_the_dashboard_works_at_375_px(browser, live_server, acme):
    page = browser.new_page(viewport={"width": 375, "height": 800})
    log_in(page, live_server)

    width = page.evaluate("document.documentElement.scrollWidth")

    assert width <= 375  # no sideways scrolling on a phone
    page.screenshot(path=str(SCREENSHOTS / "dashboard-mobile.png"), full_page=True)


def test_the_customer_sets_a_cap_and_usage_stops_at_it(browser, live_server, acme):
    _, key = api_key_create(name="browser-test")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    log_in(page, live_server)
    page.click("nav >> text=Controls")

    page.fill("#id_spend_cap", "25")
    page.click("#spend-cap-card button[type=submit]")
    assert "cannot exceed the plan" in page.text_content("#spend-cap-card .error")  # shown inline, not saved
    page.fill("#id_spend_cap", "5")
    page.click("#spend-cap-card button[type=submit]")

    assert "Your spend cap is saved." in page.text_content("body")
    assert page.text_content("#cap-in-force").strip() == "USD 5.00"
    page.screenshot(path=str(SCREENSHOTS / "controls.png"), full_page=True)
    auth = {"Authorization": f"Bearer {key}"}
    sent = page.request.post(f"{live_server.url}/api/v1/events", headers=auth,
                             data={"id": "cap-1", "customer": "acme", "feature": "gpt-4o", "quantity": 1234})
    assert sent.status == 201  # 2 340 credits of overage: USD 4.68
    check = page.request.post(f"{live_server.url}/api/v1/entitlements/check", headers=auth,
                              data={"customer": "acme", "feature": "gpt-4o", "quantity": 100})
    assert check.json()["allowed"] is False and check.json()["reason"] == "spend_cap_reached"
    page.click("nav >> text=Dashboard")
    assert page.text_content("#spend-cap").strip() == "USD 4.68 of USD 5.00 overage cap used (94 %)."
