"""Usage history: exact credits by day and by feature for a known two months, the event
list's filters and pages, a CSV of exactly the filtered events, and only one's own data."""

import csv
import io
import re
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import BillingPeriod, CustomerMember
from billing.services.metering import EventInput, record_event, record_events
from tests.factories import FeatureFactory, make_customer, pro_plan, utc

pytestmark = pytest.mark.django_db
NOW = utc(2026, 5, 16)
CSV_HEADER = ["event_id", "timestamp", "feature", "quantity", "credits", "overage_credits", "status", "reason"]


def send(event_id, feature, quantity, at, customer="acme"):
    return record_event(event=EventInput(event_id=event_id, customer=customer, feature=feature,
                                         quantity=Decimal(quantity), timestamp=at), now=at)[0]


@pytest.fixture
def acme(client):
    """Pro (10 000 included credits, $0.002 a credit over, overage capped at $2 = 1 000
    credits). April: 600 credits. May: 8 000 included by the 2nd, 500 over on the 10th, a
    gpt-4o call that would pass the cap rejected on the 15th, 200 more over that day."""
    FeatureFactory(code="api", name="API calls")
    FeatureFactory(code="gpt-4o", name="GPT-4o", default_credits_per_unit=Decimal(10))
    customer = make_customer(pro_plan(overage_cap=Decimal(2)), started_at=utc(2026, 4, 1), external_id="acme")
    customer.name = "Acme Corp"
    customer.save()
    send("a1", "api", "100", utc(2026, 4, 3, 9))
    send("a2", "gpt-4o", "50", utc(2026, 4, 20, 9))
    send("m1", "api", "3000", utc(2026, 5, 2, 12))
    send("m2", "gpt-4o", "500", utc(2026, 5, 2, 18))
    send("m3", "api", "2500", utc(2026, 5, 10, 8, 30))
    send("m4", "gpt-4o", "100", utc(2026, 5, 15, 10))
    send("m5", "api", "200", utc(2026, 5, 15, 11))
    user = get_user_model().objects.create_user("ap@acme.test", "ap@acme.test", "pw-acme-123")
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    client.force_login(user)
    return customer


def periods(customer):
    april, may = BillingPeriod.objects.filter(customer=customer).order_by("start")
    return april, may


def event_ids(html: str) -> list[str]:
    """The event ids in the event table, in order (second column)."""
    table = html.split('id="event-table"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>", table)


def csv_rows(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


@time_machine.travel(NOW, tick=False)
def test_usage_page_shows_this_periods_credits_by_day_and_by_feature(client, acme):
    page = client.get("/portal/usage/").content.decode()

    assert '<strong id="period-credits">10,700</strong> credits from May 1 to Jun 1, 2026' in page
    # One row per day of May; idle days are 0.
    assert page.split('id="daily-table"')[1].split("</table>")[0].count("<tr><td>May ") == 31
    assert '<tr><td>May 2</td><td class="num">8,000</td></tr>' in page
    assert '<tr><td>May 10</td><td class="num">2,500</td></tr>' in page
    assert '<tr><td>May 15</td><td class="num">200</td></tr>' in page  # the rejected call is not usage
    assert '<tr><td>May 3</td><td class="num">0</td></tr>' in page
    # By feature, from rollups: events, quantity, credits, overage credits.
    assert ('<tr data-feature="api"><td>API calls</td><td class="num">3</td><td class="num">5,700</td>\n'
            '          <td class="num">5,700</td><td class="num">700</td></tr>') in page
    assert ('<tr data-feature="gpt-4o"><td>GPT-4o</td><td class="num">1</td><td class="num">500</td>\n'
            '          <td class="num">5,000</td><td class="num">0</td></tr>') in page
    # The chart: 31 bars for May, 30 lighter ones for April, the busiest day full height.
    assert page.count('<rect class="current"') == 31 + 2  # + the two feature bars
    assert page.count('<rect class="previous"') == 30
    assert 'height="160.0"><title>This period May 2: 8,000 credits</title>' in page
    assert "<title>Previous period Apr 20: 500 credits</title>" in page
    assert "Previous period (Apr 1 – May 1)" in page
    assert '<a href="/portal/usage/">Usage</a>' in page  # in the nav


@time_machine.travel(NOW, tick=False)
def test_a_past_period_can_be_selected(client, acme):
    april, may = periods(acme)

    page = client.get(f"/portal/usage/?period={april.pk}").content.decode()

    assert f'<option value="{may.pk}">May 1, 2026 – Jun 1, 2026 (current)</option>' in page
    assert f'<option value="{april.pk}" selected>Apr 1, 2026 – May 1, 2026</option>' in page
    assert '<strong id="period-credits">600</strong>' in page
    assert page.count('<rect class="previous"') == 0
    assert event_ids(page) == ["a2", "a1"]


@time_machine.travel(NOW, tick=False)
def test_events_are_newest_first_and_filter_by_feature_and_dates(client, acme):
    everything = client.get("/portal/usage/").content.decode()
    api_only = client.get("/portal/usage/?feature=api").content.decode()
    days = client.get("/portal/usage/?from=2026-05-10&to=2026-05-15").content.decode()
    both = client.get("/portal/usage/?feature=gpt-4o&from=2026-05-03&to=2026-05-15").content.decode()

    assert event_ids(everything) == ["m5", "m4", "m3", "m2", "m1"]
    assert 'Rejected <span class="muted">(spend_cap_reached)</span>' in everything
    assert event_ids(api_only) == ["m5", "m3", "m1"]
    assert '<option value="api" selected>API calls</option>' in api_only
    assert event_ids(days) == ["m5", "m4", "m3"]  # both ends included, whole UTC days
    assert 'name="from" value="2026-05-10"' in days and 'name="to" value="2026-05-15"' in days
    assert event_ids(both) == ["m4"]
    assert '<p class="muted" id="event-count">1 event</p>' in both


@time_machine.travel(NOW, tick=False)
def test_the_farthest_dates_are_no_bound_not_an_error(client, acme):
    far = "from=0001-01-01&to=9999-12-31"
    page = client.get(f"/portal/usage/?{far}")
    partial = client.get(f"/portal/usage/?{far}", HTTP_HX_REQUEST="true")
    export = client.get(f"/portal/usage/events.csv?{far}")
    from_may_10 = client.get("/portal/usage/?from=2026-05-10&to=9999-12-31").content.decode()
    until_may_9 = client.get("/portal/usage/events.csv?from=0001-01-01&to=2026-05-09")

    assert (page.status_code, partial.status_code, export.status_code) == (200, 200, 200)
    assert event_ids(page.content.decode()) == ["m5", "m4", "m3", "m2", "m1"]
    assert '<p class="muted" id="event-count">5 events</p>' in page.content.decode()
    assert event_ids(partial.content.decode()) == ["m5", "m4", "m3", "m2", "m1"]
    assert [row[0] for row in csv_rows(export)] == ["event_id", "m5", "m4", "m3", "m2", "m1"]
    assert event_ids(from_may_10) == ["m5", "m4", "m3"]
    assert '<p class="muted" id="event-count">3 events</p>' in from_may_10
    assert [row[0] for row in csv_rows(until_may_9)] == ["event_id", "m2", "m1"]


@time_machine.travel(NOW, tick=False)
def test_events_are_paginated_fifty_a_page_and_links_keep_the_filters(client, acme):
    _, may = periods(acme)
    at = utc(2026, 5, 12)
    record_events(events=[EventInput(event_id=f"p{n:02}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=at.replace(minute=n)) for n in range(55)], now=NOW)

    first = client.get("/portal/usage/?feature=api").content.decode()
    second = client.get(f"/portal/usage/?period={may.pk}&feature=api&page=2").content.decode()

    assert '<p class="muted" id="event-count">58 events</p>' in first
    assert "Page 1 of 2" in first
    assert event_ids(first) == ["m5"] + [f"p{n:02}" for n in range(54, 5, -1)]
    assert f'href="?period={may.pk}&amp;feature=api&amp;page=2"' in first
    assert f'hx-get="/portal/usage/?period={may.pk}&amp;feature=api&amp;page=2"' in first
    assert event_ids(second) == [f"p{n:02}" for n in range(5, -1, -1)] + ["m3", "m1"]
    assert "Page 2 of 2" in second


@time_machine.travel(NOW, tick=False)
def test_csv_export_is_exactly_the_filtered_events_on_all_pages(client, acme):
    _, may = periods(acme)

    response = client.get(f"/portal/usage/events.csv?period={may.pk}&feature=api&from=2026-05-02&to=2026-05-10")
    rejected = csv_rows(client.get("/portal/usage/events.csv?feature=gpt-4o"))

    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert 'attachment; filename="usage-acme-2026-05-01.csv"' == response["Content-Disposition"]
    assert csv_rows(response) == [
        CSV_HEADER,
        ["m3", "2026-05-10T08:30:00Z", "api", "2500", "2500", "500", "accepted", ""],
        ["m1", "2026-05-02T12:00:00Z", "api", "3000", "3000", "0", "accepted", ""],
    ]
    assert rejected[0] == CSV_HEADER
    assert rejected[1:] == [
        ["m4", "2026-05-15T10:00:00Z", "gpt-4o", "100", "1000", "0", "rejected", "spend_cap_reached"],
        ["m2", "2026-05-02T18:00:00Z", "gpt-4o", "500", "5000", "0", "accepted", ""],
    ]


@time_machine.travel(NOW, tick=False)
def test_csv_export_has_every_page(client, acme):
    record_events(events=[EventInput(event_id=f"p{n:03}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=utc(2026, 5, 12, n // 60, n % 60)) for n in range(120)], now=NOW)

    rows = csv_rows(client.get("/portal/usage/events.csv?feature=api"))

    assert len(rows) == 1 + 123
    assert [row[0] for row in rows[1:]] == ["m5"] + [f"p{n:03}" for n in range(119, -1, -1)] + ["m3", "m1"]


@time_machine.travel(NOW, tick=False)
def test_the_events_partial_is_what_htmx_fetches(client, acme):
    partial = client.get("/portal/usage/?feature=api", HTTP_HX_REQUEST="true").content.decode()

    assert partial.lstrip().startswith('<div id="events">')
    assert "<html" not in partial and "daily-chart" not in partial and 'id="event-filters"' not in partial
    assert event_ids(partial) == ["m5", "m3", "m1"]
    assert "feature=api" in partial.split('id="export-csv"')[1].split(">")[0]


@time_machine.travel(NOW, tick=False)
def test_page_and_partial_vary_on_hx_request(client, acme):
    page = client.get("/portal/usage/?feature=api")
    partial = client.get("/portal/usage/?feature=api", HTTP_HX_REQUEST="true")

    assert "HX-Request" in page["Vary"] and "HX-Request" in partial["Vary"]


@time_machine.travel(NOW, tick=False)
def test_an_htmx_history_restore_gets_the_full_page_with_its_charts(client, acme):
    response = client.get("/portal/usage/?feature=api", HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true")

    page = response.content.decode()
    assert "<html" in page and "daily-chart" in page and 'id="event-filters"' in page
    assert event_ids(page) == ["m5", "m3", "m1"]
    assert "HX-Request" in response["Vary"]


def test_just_after_a_period_ends_the_new_period_is_the_current_one(client, acme):
    """At 00:30 on June 1 no June period row exists until something opens it: May has
    ended and must not be labelled (or shown as) the current period."""
    with time_machine.travel(utc(2026, 6, 1, 0, 30), tick=False):
        page = client.get("/portal/usage/").content.decode()
        export = client.get("/portal/usage/events.csv")

    april, may, june = BillingPeriod.objects.filter(customer=acme).order_by("start")
    assert re.findall(r'<option value="(\d+)"( selected)?>([^<]*)</option>', page) == [
        (str(june.pk), " selected", "Jun 1, 2026 – Jul 1, 2026 (current)"),
        (str(may.pk), "", "May 1, 2026 – Jun 1, 2026"),
        (str(april.pk), "", "Apr 1, 2026 – May 1, 2026"),
    ]
    assert '<p class="muted" id="event-count">0 events</p>' in page
    assert "No events match." in page
    assert export["Content-Disposition"] == 'attachment; filename="usage-acme-2026-06-01.csv"'
    assert [row[0] for row in csv_rows(export)] == ["event_id"]


@time_machine.travel(NOW, tick=False)
def test_another_customers_period_is_not_found_and_their_data_never_shows(client, acme, django_user_model):
    april, may = periods(acme)
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    send("g1", "api", "7", utc(2026, 5, 4), customer="globex")
    user = django_user_model.objects.create_user("b@globex.test", "b@globex.test", "pw")
    CustomerMember.objects.create(user=user, customer=BillingPeriod.objects.get(customer__external_id="globex").customer)
    client.force_login(user)

    for url in (f"/portal/usage/?period={may.pk}", f"/portal/usage/?period={april.pk}",
                f"/portal/usage/events.csv?period={may.pk}", "/portal/usage/?period=nonsense"):
        assert client.get(url).status_code == 404, url
    assert client.get(f"/portal/usage/?period={may.pk}", HTTP_HX_REQUEST="true").status_code == 404
    page = client.get("/portal/usage/").content.decode()
    assert event_ids(page) == ["g1"]
    assert '<strong id="period-credits">7</strong>' in page
    assert [row[0] for row in csv_rows(client.get("/portal/usage/events.csv"))] == ["event_id", "g1"]


def test_usage_needs_a_login(client):
    for url in ("/portal/usage/", "/portal/usage/events.csv"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/portal/login/")


@pytest.mark.parametrize("filters", [
    {}, {"feature": "gpt-4o"}, {"feature": "api"}, {"since": "2026-05-10"}, {"until": "2026-05-10"},
    {"since": "2026-05-15", "until": "2026-05-15"}, {"feature": "gpt-4o", "since": "2026-05-03"},
    {"since": "2026-05-20"},
])
def test_the_event_count_from_rollups_equals_the_events_listed(acme, filters):
    """The pager's count comes from rollups plus rejected events; it must equal the list."""
    from datetime import date

    from billing.selectors_usage import period_event_count, period_events
    from plans.models import Feature

    _, may = periods(acme)
    args = {"feature": Feature.objects.get(code=filters["feature"]) if "feature" in filters else None,
            "since": date.fromisoformat(filters["since"]) if "since" in filters else None,
            "until": date.fromisoformat(filters["until"]) if "until" in filters else None}

    assert period_event_count(acme, may, **args) == period_events(acme, may, **args).count()
