"""Usage history: exact credits by day and by feature for a known two months, the event
list's filters and pages, a CSV of exactly the filtered events, and only one's own data."""

import csv
import io
import re
from decimal import Decimal
from html import escape, unescape

import pytest
import time_machine
from django.contrib.auth import get_user_model

from billing.models import BillingPeriod, CustomerMember, UsageEvent
from billing.selectors_usage import EventCursor
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


def pager_link(html: str, rel: str) -> str | None:
    """The href of the pager's "prev" (Newer) or "next" (Older) link, unescaped; None if absent."""
    found = re.search(rf'rel="{rel}" href="([^"]*)"', html)
    return unescape(found.group(1)) if found else None


@time_machine.travel(NOW, tick=False)
def test_events_are_paginated_fifty_a_page_and_links_keep_the_filters(client, acme):
    _, may = periods(acme)
    at = utc(2026, 5, 12)
    record_events(events=[EventInput(event_id=f"p{n:02}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=at.replace(minute=n)) for n in range(55)], now=NOW)

    first = client.get("/portal/usage/?feature=api").content.decode()
    older = pager_link(first, "next")
    second = client.get(f"/portal/usage/{older}").content.decode()
    newer = pager_link(second, "prev")
    back = client.get(f"/portal/usage/{newer}").content.decode()

    assert '<p class="muted" id="event-count">58 events</p>' in first
    assert event_ids(first) == ["m5"] + [f"p{n:02}" for n in range(54, 5, -1)]
    # The newest page has no Newer link; its Older link starts after its last row and keeps the filters.
    assert pager_link(first, "prev") is None and "Newest" not in first
    p06 = UsageEvent.objects.get(event_id="p06")
    assert older == f"?period={may.pk}&feature=api&after={EventCursor.of(p06).token()}"
    assert f'hx-get="/portal/usage/{escape(older)}"' in first
    assert event_ids(second) == [f"p{n:02}" for n in range(5, -1, -1)] + ["m3", "m1"]
    assert '<p class="muted" id="event-count">58 events</p>' in second
    # The last page: Newer (before its first row) and Newest, no Older.
    assert pager_link(second, "next") is None
    p05 = UsageEvent.objects.get(event_id="p05")
    assert newer == f"?period={may.pk}&feature=api&before={EventCursor.of(p05).token()}"
    assert f'href="?period={may.pk}&amp;feature=api"' in second and "Newest" in second
    assert event_ids(back) == event_ids(first)
    assert pager_link(back, "prev") is None and pager_link(back, "next") == older


def walk(client, url: str, rel: str) -> list[list[str]]:
    """Every page from `url`, following the pager's `rel` link to the end."""
    pages = []
    while url is not None:
        html = client.get(f"/portal/usage/{url}").content.decode()
        pages.append(event_ids(html))
        url = pager_link(html, rel)
    return pages


@time_machine.travel(NOW, tick=False)
def test_pages_by_position_have_no_duplicate_and_no_gap_even_when_events_share_an_instant(client, acme):
    """Keyset paging on (timestamp, id): 130 events at one instant are told apart by id,
    so walking Older to the end and Newer back lists every event once, in order."""
    _, may = periods(acme)
    same = utc(2026, 5, 12, 6)
    record_events(events=[EventInput(event_id=f"s{n:03}", customer="acme", feature="api", quantity=Decimal(1),
                                     timestamp=same) for n in range(130)], now=NOW)
    record_events(events=[EventInput(event_id=f"t{n:02}", customer="acme", feature="gpt-4o", quantity=Decimal(0),
                                     timestamp=same.replace(hour=n % 24, minute=n)) for n in range(40)], now=NOW)
    expected = list(UsageEvent.objects.filter(customer=acme, period=may).order_by("-timestamp", "-id")
                    .values_list("event_id", flat=True))

    older = walk(client, "?", "next")
    listed = [event_id for page in older for event_id in page]
    url, html = "?", client.get("/portal/usage/").content.decode()
    while pager_link(html, "next"):  # to the last page, then back by the Newer links
        url = pager_link(html, "next")
        html = client.get(f"/portal/usage/{url}").content.decode()
    back = walk(client, url, "prev")

    assert len(expected) == 5 + 130 + 40
    assert listed == expected and len(set(listed)) == len(listed)
    assert [len(page) for page in older] == [50, 50, 50, 25]
    assert back == older[::-1]


@time_machine.travel(NOW, tick=False)
def test_filtered_pages_keep_the_feature_and_days_and_list_exactly_the_filtered_events(client, acme):
    _, may = periods(acme)
    record_events(events=[EventInput(event_id=f"f{n:03}", customer="acme", feature=("api", "gpt-4o")[n % 2],
                                     quantity=Decimal(0), timestamp=utc(2026, 5, 3 + n % 10, n % 24, n % 60))
                          for n in range(300)], now=NOW)
    expected = list(UsageEvent.objects.filter(customer=acme, period=may, feature__code="gpt-4o",
                                              timestamp__gte=utc(2026, 5, 5), timestamp__lt=utc(2026, 5, 11))
                    .order_by("-timestamp", "-id").values_list("event_id", flat=True))

    pages = walk(client, "?feature=gpt-4o&from=2026-05-05&to=2026-05-10", "next")

    assert [event_id for page in pages for event_id in page] == expected
    assert len(expected) == 90 and [len(page) for page in pages] == [50, 40]
    html = client.get("/portal/usage/?feature=gpt-4o&from=2026-05-05&to=2026-05-10").content.decode()
    assert pager_link(html, "next").startswith(f"?period={may.pk}&feature=gpt-4o&from=2026-05-05&to=2026-05-10&after=")


@time_machine.travel(NOW, tick=False)
def test_events_arriving_meanwhile_neither_repeat_nor_skip_a_row_on_the_next_page(client, acme):
    record_events(events=[EventInput(event_id=f"p{n:02}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=utc(2026, 5, 12, 0, n)) for n in range(60)], now=NOW)
    first = client.get("/portal/usage/").content.decode()
    record_events(events=[EventInput(event_id=f"new{n}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=utc(2026, 5, 15, 23, n)) for n in range(7)], now=NOW)

    second = client.get(f"/portal/usage/{pager_link(first, 'next')}").content.decode()
    back = client.get(f"/portal/usage/{pager_link(second, 'prev')}").content.decode()

    # Page 1 ended at p12; page 2 starts right after it, as an OFFSET of 50 would not (it would repeat 7 rows).
    assert event_ids(first)[:3] == ["m5", "m4", "p59"] and event_ids(first)[-1] == "p12"
    assert event_ids(second)[0] == "p11"
    assert not set(event_ids(first)) & set(event_ids(second))
    # Going back, the newer page is the 50 rows above page 2, and the new events are above that.
    assert event_ids(back) == event_ids(first)
    assert pager_link(back, "prev") is not None
    assert event_ids(client.get("/portal/usage/").content.decode())[:7] == [f"new{n}" for n in range(6, -1, -1)]


@time_machine.travel(NOW, tick=False)
def test_newer_from_near_the_top_lands_on_the_newest_full_page(client, acme):
    record_events(events=[EventInput(event_id=f"p{n:02}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=utc(2026, 5, 12, 0, n)) for n in range(60)], now=NOW)
    third_from_top = UsageEvent.objects.filter(customer=acme).order_by("-timestamp", "-id")[2]

    html = client.get(f"/portal/usage/?before={EventCursor.of(third_from_top).token()}").content.decode()

    assert event_ids(html) == event_ids(client.get("/portal/usage/").content.decode())
    assert len(event_ids(html)) == 50 and pager_link(html, "prev") is None and pager_link(html, "next")


@time_machine.travel(NOW, tick=False)
@pytest.mark.parametrize("cursor", ["nonsense", "12_", "_3", "1_2_3", "99999999999999999999_1",
                                    "1778544000000000_99999999999999999999", "-5_-5", ""])
def test_a_malformed_cursor_starts_at_the_newest_page(client, acme, cursor):
    for param in ("after", "before"):
        response = client.get(f"/portal/usage/?{param}={cursor}")
        assert response.status_code == 200
        assert event_ids(response.content.decode()) == ["m5", "m4", "m3", "m2", "m1"]


@time_machine.travel(NOW, tick=False)
def test_a_cursor_at_another_customers_event_shows_none_of_their_events(client, acme):
    """A position is only a (timestamp, id) bound on the customer's own events of the
    selected period: another account's event id in it reveals nothing of theirs."""
    make_customer(pro_plan(), started_at=utc(2026, 5, 1), external_id="globex")
    record_events(events=[EventInput(event_id=f"g{n}", customer="globex", feature="api", quantity=Decimal(1),
                                     timestamp=utc(2026, 5, 12, 0, n)) for n in range(60)], now=NOW)
    theirs = UsageEvent.objects.filter(customer__external_id="globex").order_by("-timestamp", "-id")[30]

    for param in ("after", "before"):
        html = client.get(f"/portal/usage/?{param}={EventCursor.of(theirs).token()}").content.decode()
        partial = client.get(f"/portal/usage/?{param}={EventCursor.of(theirs).token()}",
                             HTTP_HX_REQUEST="true").content.decode()
        assert not [e for e in event_ids(html) + event_ids(partial) if e.startswith("g")]
    # After their event's position: acme's own events older than it (m3, m2, m1), nothing of Globex.
    assert event_ids(client.get(f"/portal/usage/?after={EventCursor.of(theirs).token()}").content.decode()) == [
        "m3", "m2", "m1"]


def test_a_cursor_token_round_trips_to_the_microsecond():
    from datetime import timedelta

    at = utc(2026, 5, 12, 6, 30) + timedelta(microseconds=123457)
    cursor = EventCursor(at, 42)

    assert EventCursor.parse(cursor.token()) == cursor
    before_epoch = EventCursor(utc(1969, 12, 31, 23, 59), 1)
    assert EventCursor.parse(before_epoch.token()) == before_epoch


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
def test_the_export_reads_in_chunks_by_position_with_no_duplicate_and_no_gap(acme):
    """The CSV's rows come from keyset chunks; small chunks over events sharing an
    instant must still give the whole list, once, in the list's order."""
    from billing.selectors_usage import period_event_chunks
    from plans.models import Feature

    _, may = periods(acme)
    record_events(events=[EventInput(event_id=f"s{n:02}", customer="acme", feature="api", quantity=Decimal(0),
                                     timestamp=utc(2026, 5, 12, n % 3)) for n in range(40)], now=NOW)
    api = Feature.objects.get(code="api")

    for filters in ({}, {"feature": api}):
        expected = list(UsageEvent.objects.filter(customer=acme, period=may, **filters)
                        .order_by("-timestamp", "-id").values_list("event_id", flat=True))
        for size in (1, 7, 43, 2000):
            chunks = list(period_event_chunks(acme, may, size=size, **filters))
            assert [row[0] for chunk in chunks for row in chunk] == expected
            assert all(len(chunk) <= size for chunk in chunks)


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
