"""Usage history in a real browser (Debian's Chromium driven by Playwright): filter the
events by feature and download exactly those as CSV."""

import csv
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import CustomerMember
from billing.services.metering import EventInput, record_event
from tests.browser import BROWSER_TEST, SCREENSHOTS, browser, log_in  # noqa: F401 - browser is a fixture
from tests.factories import FeatureFactory, make_customer, pro_plan

pytestmark = BROWSER_TEST


@pytest.fixture
def acme():
    """Three days into a Pro period: api calls and gpt-4o calls on each day."""
    FeatureFactory(code="api", name="API calls")
    FeatureFactory(code="gpt-4o", name="GPT-4o", default_credits_per_unit=Decimal(10))
    now = timezone.now()
    started = now - timedelta(days=3)
    customer = make_customer(pro_plan(), started_at=started, external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    for n, hours_ago in enumerate((60, 40, 20, 2)):
        for feature, quantity in (("api", 100 * (n + 1)), ("gpt-4o", 10 * (n + 1))):
            at = (now - timedelta(hours=hours_ago)).replace(microsecond=0)
            record_event(event=EventInput(event_id=f"{feature}-{n}", customer="acme", feature=feature,
                                          quantity=Decimal(quantity), timestamp=at), now=now)
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    return customer


def test_filter_usage_by_feature_and_export_exactly_that_as_csv(browser, live_server, acme, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    log_in(page, live_server)

    page.click("nav >> text=Usage")
    page.wait_for_selector("#daily-chart")
    assert page.text_content("#event-count").strip() == "8 events"
    page.evaluate("window.__sameDocument = true")
    page.select_option("#event-filters select[name=feature]", "gpt-4o")
    page.click("#event-filters button[type=submit]")
    page.wait_for_function("document.querySelector('#event-count').textContent.trim() === '4 events'",
                           timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True  # htmx swapped the list; no reload
    assert "feature=gpt-4o" in page.url

    with page.expect_download() as download_info:
        page.click("text=Export CSV")
    path = tmp_path / "usage.csv"
    download_info.value.save_as(path)
    with path.open(newline="") as file:
        rows = list(csv.reader(file))

    assert rows[0] == ["event_id", "timestamp", "feature", "quantity", "credits", "overage_credits", "status",
                       "reason"]
    assert [(r[0], r[2], r[3], r[4], r[6]) for r in rows[1:]] == [
        ("gpt-4o-3", "gpt-4o", "40", "400", "accepted"),
        ("gpt-4o-2", "gpt-4o", "30", "300", "accepted"),
        ("gpt-4o-1", "gpt-4o", "20", "200", "accepted"),
        ("gpt-4o-0", "gpt-4o", "10", "100", "accepted"),
    ]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "usage.png"), full_page=True)
