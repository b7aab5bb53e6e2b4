"""Portal benchmark: server time of every portal page for a customer with many events
in the period (100 000 by default, 10 000 000 with --events 10000000).

Run from the project root:  .venv/bin/python bench/portal.py [--events 100000]
(`make bench-portal`; part of `make bench`).

What it does:
  1. drops and re-creates the PostgreSQL database `overage_bench_portal` (with --events
     other than 100 000, `overage_bench_portal_<events>`; nothing else is touched;
     --keep-db skips the rebuild and times the database a previous run built),
     migrates it and builds a customer on a tiered plan who started on 2026-05-01:
     20 000 events in May through the services (closed: an invoice with an overage line),
     then --events events spread over June 1-20, four other customers with 10 000 events
     each through the services, a pack purchase and the alerts that usage fired.

     June's events are built in three parts, in time order, so the ledger is what the
     services would have written had every event come through them:
       - the first ones (--service-events less 1 000) through the batch service, in
         1 000-event batches: they use up the period's included credits and fire the
         alerts;
       - the middle ones in bulk, by INSERT ... SELECT over generate_series: after the
         included credits are gone every event is pure overage (no cap on this plan),
         so each is one accepted event (its fingerprint computed as the service does),
         one `overage` ledger entry, and its share of the day rollups and of the
         period's cached totals, written exactly as `CustomerLedger.flush` writes them;
       - the last 1 000 through the service again, on top of the bulk rows (they read
         and update the rollups and period totals the bulk wrote).
     Then VACUUM ANALYZE (what autovacuum does after a load) and `manage.py ledger_check`
     (every cached balance, period total and rollup against its ledger entries and
     events). About 2 minutes for 100 000 events; about 6 minutes for 10 000 000 on
     2 cores (the insert, the index builds and ledger_check).
  2. freezes the clock at 2026-06-20 12:00 UTC (time-machine), logs in as the customer's
     portal user and requests every portal page and htmx partial --repeat times through
     Django's test client in this process, round robin over the pages, DEBUG off: the
     time measured is the server's (middleware, view, queries, template, a new database
     connection per request as with DB_CONN_MAX_AGE=0), not the network's. Every page is
     first checked for its figures, computed independently by aggregates over the raw
     events and ledger entries (not timed): credits used, overage, credits by feature,
     the event count, the newest event, and the event list walked three pages older and
     back against an OFFSET query;
  3. prints a table (p50 / p95 / max ms and the number of SQL queries per page) and the
     cores busy on the (shared) machine meanwhile, and writes the run into
     bench/results/portal.json (which keeps the latest run at each scale). The target is
     <= 50 ms p95 for the dashboard and usage pages and partials (issue 6, target 6);
     the other portal pages are timed alongside.

Exit status 1 if a page does not answer 200 or shows a wrong figure.
The CSV export streams every filtered event by design; it is timed separately and not
held to the page target: a one-feature, one-day export whole, and the whole period's
export to its first row and over its first --csv-rows rows (rows per second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from bench_support import PG_ADMIN_URL, ROOT, log, recreate_database

RESULTS = ROOT / "bench" / "results" / "portal.json"
DEFAULT_EVENTS = 100_000


def db_name(events: int) -> str:
    """One database per scale, so the 100 000 and the 10 000 000 builds are both kept
    and can be timed again (--keep-db) without rebuilding."""
    return "overage_bench_portal" if events == DEFAULT_EVENTS else f"overage_bench_portal_{events}"
NOW = datetime(2026, 6, 20, 12, tzinfo=timezone.utc)
MAY, JUNE = datetime(2026, 5, 1, tzinfo=timezone.utc), datetime(2026, 6, 1, tzinfo=timezone.utc)
JUNE_END = NOW - timedelta(hours=1)  # June's events lie in [JUNE, JUNE_END)
CUSTOMER, EMAIL, PASSWORD = "bench-portal", "owner@bench.test", "bench-portal-pw"
FEATURES = (("gpt-4o", Decimal("10")), ("embeddings", Decimal("1")), ("images", Decimal("40")))
TARGET_MS = 50
TAIL_EVENTS = 1_000  # June's newest events, through the services after the bulk part


def configure_django(events: int) -> None:
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name(events),
        "DEBUG": "0", "SECURE_SSL_REDIRECT": "0", "SECRET_KEY": "bench-portal-not-secret", "ALLOWED_HOSTS": "testserver",
        "LOG_LEVEL": "WARNING", "EMAIL_URL": "dummy://",
    })
    for name in ("CELERY_BROKER_URL", "REDIS_URL", "STRIPE_SECRET_KEY", "DB_CONN_MAX_AGE"):
        os.environ.pop(name, None)  # tasks eager, local invoicing, a connection per request
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


# --- Building the scenario ------------------------------------------------------------------

def event_step(count: int, start: datetime, end: datetime) -> timedelta:
    return (end - start) / count  # rounded to a microsecond, as timedelta does


def spread_events(customer: str, count: int, start: datetime, end: datetime, prefix: str, first: int = 0,
                  last: int | None = None):
    """Events `first` to `last` (exclusive) of `count` spread evenly over [start, end),
    the features in turn."""
    from billing.services.metering import EventInput

    step = event_step(count, start, end)
    for n in range(first, count if last is None else last):
        feature, _ = FEATURES[n % len(FEATURES)]
        yield EventInput(event_id=f"{prefix}-{n}", customer=customer, feature=feature,
                         quantity=Decimal(1 + n % 3), timestamp=start + step * n,
                         properties={"model": "small"} if n % 2 else {})


def ingest(events, now: datetime) -> int:
    from billing.services.metering import record_events

    batch, total = [], 0
    for event in events:
        batch.append(event)
        if len(batch) == 1000:
            total += sum(1 for r in record_events(events=batch, now=now) if r.created)
            batch = []
    if batch:
        total += sum(1 for r in record_events(events=batch, now=now) if r.created)
    return total


def fingerprint_prefixes() -> dict[tuple[int, int], str]:
    """The canonical JSON `EventInput.fingerprint` hashes, up to the timestamp's value,
    for each (feature slot, odd/even n): the bulk insert appends the timestamp and
    hashes it in SQL. The timestamp is the last key in sorted order."""
    from billing.services.metering import EventInput

    prefixes = {}
    for k, (feature, _) in enumerate(FEATURES):
        for odd in (0, 1):
            sample = EventInput(event_id="x", customer=CUSTOMER, feature=feature, quantity=Decimal(1 + k),
                                timestamp=JUNE, properties={"model": "small"} if odd else {})
            canonical = {"customer": sample.customer, "feature": sample.feature,
                         "quantity": format(sample.quantity.normalize(), "f"), "timestamp": "\x00",
                         "properties": sample.properties, "reservation_id": None}
            blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
            prefix, suffix = blob.split("\\u0000")
            assert suffix == '"}', blob
            prefixes[(k, odd)] = prefix
    return prefixes


def bulk_overage_events(*, period, first: int, last: int, count: int) -> int:
    """June's events `first` to `last` (exclusive) of `count`, written in bulk as the
    services write an event that is all overage: the event, its `overage` ledger entry,
    the day rollups and the period's cached totals. Secondary indexes of the two big
    tables are dropped for the load and built again after it (as a restore would);
    foreign keys are not checked row by row (session_replication_role = replica) and
    ledger_check verifies the result instead."""
    from django.db import connection, transaction
    from django.utils import timezone

    from billing.models import BillingPeriod, LedgerEntry, UsageEvent, UsageRollup
    from billing.services.metering import credits_for
    from plans.models import Feature

    if last <= first:
        return 0
    plan, customer_id = period.plan, period.customer_id
    step_us = event_step(count, JUNE, JUNE_END) // timedelta(microseconds=1)
    prefixes = fingerprint_prefixes()
    slots = []  # (k, feature id, quantity, credits, fingerprint prefix even, odd)
    for k, (code, _) in enumerate(FEATURES):
        feature = Feature.objects.get(code=code)
        quantity = Decimal(1 + k)
        slots.append((k, feature.pk, quantity, credits_for(plan, feature, quantity), prefixes[(k, 0)],
                      prefixes[(k, 1)]))
    values = ", ".join(["(%s, %s, %s::numeric, %s::numeric, %s, %s)"] * len(slots))
    events_table, entries_table = UsageEvent._meta.db_table, LedgerEntry._meta.db_table
    rollups_table, periods_table = UsageRollup._meta.db_table, BillingPeriod._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
        cursor.execute(f"SELECT coalesce(max(id), 0) FROM {events_table}")
        (before,) = cursor.fetchone()
        dropped = []
        for table in (events_table, entries_table):
            cursor.execute("""
                SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                WHERE x.indrelid = %s::regclass
                  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)""", [table])
            for name, definition in cursor.fetchall():
                cursor.execute(f'DROP INDEX "{name}"')
                dropped.append(definition)
        started = time.perf_counter()
        cursor.execute(f"""
            INSERT INTO {events_table} (customer_id, event_id, feature_id, quantity, credits, overage_credits,
                                        "timestamp", received_at, properties, status, reject_reason, period_id,
                                        reservation_id, fingerprint)
            SELECT %s, 'jun-' || n, s.feature_id, s.quantity, s.credits, s.credits, t.at, %s,
                   CASE WHEN n %% 2 = 1 THEN '{{"model": "small"}}'::jsonb ELSE '{{}}'::jsonb END,
                   'accepted', '', %s, NULL,
                   encode(sha256(convert_to(
                       CASE WHEN n %% 2 = 1 THEN s.prefix_odd ELSE s.prefix_even END
                       || to_char(t.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                       || CASE WHEN t.micro = 0 THEN '' ELSE '.' || lpad(t.micro::text, 6, '0') END
                       || '+00:00"}}', 'UTF8')), 'hex')
            FROM generate_series(%s::bigint, %s::bigint) AS n
            JOIN (VALUES {values}) AS s(k, feature_id, quantity, credits, prefix_even, prefix_odd) ON s.k = n %% 3
            CROSS JOIN LATERAL (SELECT %s::timestamptz + (n * %s) * interval '1 microsecond' AS at) AS a
            CROSS JOIN LATERAL (SELECT a.at, (extract(microseconds FROM a.at)::bigint %% 1000000) AS micro) AS t
            ORDER BY n""",
            [customer_id, NOW, period.pk, first, last - 1, *[v for slot in slots for v in slot], JUNE, step_us])
        inserted = cursor.rowcount
        log(f"bulk: {inserted:,} events inserted in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        cursor.execute(f"""
            INSERT INTO {entries_table} (customer_id, kind, credits, grant_id, period_id, event_id, feature_id,
                                         effective_at, created_at, note)
            SELECT customer_id, 'overage', -credits, NULL, period_id, id, feature_id, "timestamp", %s, ''
            FROM {events_table} WHERE customer_id = %s AND id > %s ORDER BY id""",
            [timezone.now(), customer_id, before])
        log(f"bulk: {cursor.rowcount:,} overage ledger entries in {time.perf_counter() - started:.0f} s")
        cursor.execute(f"""
            INSERT INTO {rollups_table} (period_id, feature_id, day, events, quantity, credits, overage_credits,
                                         overage_events)
            SELECT period_id, feature_id, ("timestamp" AT TIME ZONE 'UTC')::date, count(*), sum(quantity),
                   sum(credits), sum(overage_credits), count(*) FILTER (WHERE overage_credits > 0)
            FROM {events_table} WHERE customer_id = %s AND id > %s GROUP BY 1, 2, 3
            ON CONFLICT (period_id, feature_id, day) DO UPDATE SET
                events = {rollups_table}.events + excluded.events,
                quantity = {rollups_table}.quantity + excluded.quantity,
                credits = {rollups_table}.credits + excluded.credits,
                overage_credits = {rollups_table}.overage_credits + excluded.overage_credits,
                overage_events = {rollups_table}.overage_events + excluded.overage_events""",
            [customer_id, before])
        cursor.execute(f"""
            UPDATE {periods_table} p SET credits_used = p.credits_used + e.credits,
                                         overage_credits = p.overage_credits + e.overage
            FROM (SELECT sum(credits) AS credits, sum(overage_credits) AS overage FROM {events_table}
                  WHERE customer_id = %s AND id > %s) e
            WHERE p.id = %s""", [customer_id, before, period.pk])
        started = time.perf_counter()
        for definition in dropped:
            cursor.execute(definition)
        log(f"bulk: {len(dropped)} secondary indexes built again in {time.perf_counter() - started:.0f} s")
    check_bulk_sample(first, last, count)
    return inserted


def check_bulk_sample(first: int, last: int, count: int) -> None:
    """A few bulk rows against what the service would have stored for the same input."""
    from billing.models import UsageEvent

    picks = sorted({first, first + 1, (first + last) // 2, (first + last) // 2 + 1, last - 1})
    for n in picks:
        expected = next(spread_events(CUSTOMER, count, JUNE, JUNE_END, "jun", first=n, last=n + 1))
        stored = UsageEvent.objects.select_related("feature").get(customer__external_id=CUSTOMER,
                                                                  event_id=expected.event_id)
        got = (stored.timestamp, stored.feature.code, stored.quantity, stored.properties, stored.fingerprint)
        want = (expected.timestamp, expected.feature, expected.quantity, expected.properties,
                expected.fingerprint())
        assert got == want, f"bulk event {n}: stored {got}, the service would store {want}"


def build(events: int, service_events: int) -> dict:
    """The scenario. Returns how it was built."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from billing.models import BillingPeriod, CreditGrant, CustomerMember
    from billing.services.customers import customer_create
    from billing.services.invoicing import close_period
    from billing.services.purchases import purchase_pack
    from plans.models import CreditPack
    from plans.services import TierInput, feature_create, plan_create

    call_command("migrate", verbosity=0)
    for code, credits in FEATURES:
        feature_create(code=code, name=code, default_credits_per_unit=credits)
    plan_create(code="growth", name="Growth", base_price=Decimal("99"), included_credits=Decimal("500000"),
                overage_enabled=True, overage_tiers=[TierInput(Decimal("1000000"), Decimal("0.0004")),
                                                     TierInput(None, Decimal("0.0003"))])
    plan_create(code="scale", name="Scale", base_price=Decimal("399"), included_credits=Decimal("2000000"),
                overage_enabled=True, overage_unit_price=Decimal("0.0002"))
    CreditPack.objects.create(code="boost", name="Boost 100k", currency="USD", credits=Decimal("100000"),
                              price=Decimal("30"))
    customer = customer_create(external_id=CUSTOMER, name="Bench Portal Inc.", email=EMAIL, plan_code="growth",
                               started_at=MAY, now=MAY)
    user = get_user_model().objects.create_user(EMAIL, EMAIL, PASSWORD)
    CustomerMember.objects.create(user=user, customer=customer, is_owner=True)
    others = [customer_create(external_id=f"bench-other-{n}", name=f"Other {n}", plan_code="growth",
                              started_at=MAY, now=MAY) for n in range(4)]
    started = time.perf_counter()
    through_services = ingest(spread_events(CUSTOMER, 20_000, MAY, JUNE, "may"), now=JUNE)
    for period in BillingPeriod.objects.filter(end=JUNE):
        close_period(period_id=period.pk, now=JUNE + timedelta(hours=2))

    tail = min(TAIL_EVENTS, events)
    head = min(events - tail, max(service_events - tail, 0))
    june = BillingPeriod.objects.select_related("plan").get(customer=customer, start=JUNE)
    through_services += ingest(spread_events(CUSTOMER, events, JUNE, JUNE_END, "jun", last=head), now=NOW)
    bulk = 0
    if head < events - tail:
        usable = CreditGrant.objects.filter(customer=customer, remaining__gt=0, expires_at__gt=NOW).count()
        if usable:
            raise SystemExit(f"{head:,} events through the services left credits unused; the bulk part must be "
                             f"pure overage: raise --service-events")
        june.refresh_from_db()
        bulk_started = time.perf_counter()
        bulk = bulk_overage_events(period=june, first=head, last=events - tail, count=events)
        log(f"bulk part: {bulk:,} events in {time.perf_counter() - bulk_started:.0f} s")
    through_services += ingest(spread_events(CUSTOMER, events, JUNE, JUNE_END, "jun", first=events - tail),
                               now=NOW)
    for other in others:
        through_services += ingest(spread_events(other.external_id, 10_000, JUNE, JUNE_END, other.external_id),
                                   now=NOW)
    purchase_pack(customer=customer, pack_code="boost", idempotency_key="bench-boost", now=NOW)
    vacuum_started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # what autovacuum does after a bulk load in production
    log(f"VACUUM ANALYZE in {time.perf_counter() - vacuum_started:.0f} s")
    seconds = time.perf_counter() - started
    log(f"built {through_services + bulk:,} events ({through_services:,} through the batch service, {bulk:,} in "
        f"bulk) in {seconds:.0f} s")
    check_started = time.perf_counter()
    call_command("ledger_check")  # raises on the first cache that disagrees with its entries
    log(f"ledger_check passed in {time.perf_counter() - check_started:.0f} s")
    return {"events_in_period": events, "through_services": through_services, "in_bulk": bulk,
            "build_seconds": round(seconds, 1), "ledger_check_seconds": round(time.perf_counter() - check_started, 1),
            "built_at": timezone.now().isoformat(timespec="seconds")}


# --- What the pages must show ---------------------------------------------------------------

def expected_figures() -> dict:
    """June's figures for the bench customer from the raw events, one aggregate each
    (not timed): what the pages, which read rollups and caches, must agree with."""
    from django.db import connection

    from billing.models import BillingPeriod, LedgerEntry, UsageEvent

    june = BillingPeriod.objects.get(customer__external_id=CUSTOMER, start=JUNE)
    table = UsageEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"""
            SELECT f.code, count(*) FILTER (WHERE e.status = 'accepted'), coalesce(sum(e.quantity) FILTER (WHERE
                   e.status = 'accepted'), 0), coalesce(sum(e.credits) FILTER (WHERE e.status = 'accepted'), 0),
                   coalesce(sum(e.overage_credits) FILTER (WHERE e.status = 'accepted'), 0), count(*)
            FROM {table} e JOIN plans_feature f ON f.id = e.feature_id
            WHERE e.period_id = %s GROUP BY f.code""", [june.pk])
        by_feature = {code: {"events": n, "quantity": q, "credits": c, "overage_credits": o, "listed": listed}
                      for code, n, q, c, o, listed in cursor.fetchall()}
        # The dashboard's overage is the ledger's: the events' overage less what the pack
        # bought at the end paid down.
        cursor.execute(f"SELECT -coalesce(sum(credits), 0) FROM {LedgerEntry._meta.db_table} "
                       f"WHERE period_id = %s AND kind = 'overage'", [june.pk])
        (ledger_overage,) = cursor.fetchone()
    return {"period": june, "by_feature": by_feature,
            "credits": sum((f["credits"] for f in by_feature.values()), Decimal(0)),
            "overage_credits": ledger_overage,
            "listed": sum(f["listed"] for f in by_feature.values())}


def listed_events(period, *, feature: str | None = None, offset: int = 0, limit: int = 50):
    """Event rows as the list must show them, newest first, by OFFSET (not timed)."""
    from billing.models import UsageEvent

    events = UsageEvent.objects.filter(customer__external_id=CUSTOMER, period=period)
    if feature:
        events = events.filter(feature__code=feature)
    return list(events.order_by("-timestamp", "-id")[offset:offset + limit])


def cursor_token(event) -> str:
    from billing.selectors_usage import EventCursor

    return EventCursor(event.timestamp, event.pk).token()


def pages(figures: dict) -> list[tuple[str, str, dict, list[str]]]:
    """(name, url, headers, texts the answer must contain)."""
    from billing.models import BillingPeriod, Invoice, InvoiceLine
    from plans.money import format_credits

    june = figures["period"]
    may = BillingPeriod.objects.get(customer__external_id=CUSTOMER, start=MAY)
    invoice = Invoice.objects.filter(customer__external_id=CUSTOMER, period=may).first()
    overage = invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)
    htmx = {"HX-Request": "true"}
    total = figures["listed"]
    deep = listed_events(june, offset=total // 2, limit=2)  # the middle of the period
    deep_gpt = listed_events(june, feature="gpt-4o", offset=figures["by_feature"]["gpt-4o"]["listed"] // 2, limit=2)
    newest = listed_events(june, limit=1)[0]
    filtered = listed_events(june, feature="images", limit=1)  # newest images event up to June 15 below
    from billing.models import UsageEvent

    images_by_15th = (UsageEvent.objects.filter(period=june, feature__code="images",
                                                timestamp__lt=datetime(2026, 6, 16, tzinfo=timezone.utc))
                      .order_by("-timestamp", "-id").first())
    assert filtered
    feature_rows = [
        f'<tr data-feature="{code}"><td>{code}</td><td class="num">{f["events"]}</td>'
        f'<td class="num">{format_credits(f["quantity"])}</td>'
        for code, f in figures["by_feature"].items()
    ]
    return [
        ("dashboard", "/portal/", {}, [f'<dd id="credits-used">{format_credits(figures["credits"])}</dd>',
                                       f'<dd id="overage-credits">{format_credits(figures["overage_credits"])}</dd>']),
        ("dashboard figures (htmx poll)", "/portal/", htmx,
         [f'<dd id="credits-used">{format_credits(figures["credits"])}</dd>']),
        ("usage, this period", "/portal/usage/", {},
         [f'<strong id="period-credits">{format_credits(figures["credits"])}</strong>', f'>{total} events<',
          f"<td>{newest.event_id}</td>", *feature_rows]),
        ("usage, last period", f"/portal/usage/?period={may.pk}", {}, ["gpt-4o", "may-19999"]),
        ("usage, filtered", "/portal/usage/?feature=images&from=2026-06-05&to=2026-06-15", {},
         [f"<td>{images_by_15th.event_id}</td>"]),
        ("usage, events mid-period (older)", f"/portal/usage/?after={cursor_token(deep[0])}", {},
         [f"<td>{deep[1].event_id}</td>"]),
        ("usage events mid-period (htmx, newer)", f"/portal/usage/?before={cursor_token(deep[1])}", htmx,
         [f"<td>{deep[0].event_id}</td>"]),
        ("usage events gpt-4o mid-period (htmx)", f"/portal/usage/?feature=gpt-4o&after={cursor_token(deep_gpt[0])}",
         htmx, [f"<td>{deep_gpt[1].event_id}</td>"]),
        ("invoices", "/portal/invoices/", {}, [invoice.number]),
        ("invoice", f"/portal/invoices/{invoice.number}/", {}, ["invoice-total"]),
        ("invoice line drill-down", f"/portal/invoices/{invoice.number}/lines/{overage.pk}/", {}, ["gpt-4o"]),
        ("buy credits", "/portal/credits/", {}, ["Boost 100k"]),
        ("controls", "/portal/controls/", {}, ["spend cap"]),
        ("notifications", "/portal/notifications/", {}, ["Notifications"]),
        ("team", "/portal/team/", {}, [EMAIL]),
        ("change plan (confirm)", "/portal/plan/change/scale/", {}, ["Scale"]),
    ]


def event_ids(html: str) -> list[str]:
    table = html.split('id="event-table"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>", table)


def check_paging(client, figures: dict) -> list[str]:
    """From the middle of the period, follow "Older" three times and "Newer" back: each
    page must be exactly the OFFSET query's rows, with no duplicate and no gap."""
    from html import unescape

    june, total = figures["period"], figures["listed"]
    failures = []
    start = total // 2
    url = f"/portal/usage/?after={cursor_token(listed_events(june, offset=start - 1, limit=1)[0])}"
    for step in range(3):
        html = client.get(url).content.decode()
        want = [e.event_id for e in listed_events(june, offset=start + 50 * step)]
        if event_ids(html) != want:
            failures.append(f"older page {step + 1} from the middle: {event_ids(html)[:3]}… not {want[:3]}…")
            return failures
        url = "/portal/usage/" + unescape(re.search(r'rel="next" href="([^"]+)"', html).group(1))
    for step in (1, 0):
        url = "/portal/usage/" + unescape(re.search(r'rel="prev" href="([^"]+)"', html).group(1))
        html = client.get(url).content.decode()
        want = [e.event_id for e in listed_events(june, offset=start + 50 * step)]
        if event_ids(html) != want:
            failures.append(f"newer page back to {step + 1}: {event_ids(html)[:3]}… not {want[:3]}…")
            return failures
    return failures


# --- Timing ---------------------------------------------------------------------------------

def cpu_sample() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds on the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as stat:
        jiffies = [int(v) for v in stat.readline().split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    times = os.times()
    return time.monotonic(), (sum(jiffies[:8]) - idle) / ticks, times.user + times.system


def cpu_report(before: tuple, after: tuple) -> dict:
    """Cores busy on the machine while pages were timed, and how many of them were this
    process (the database backends serving it are in the first figure, not the second).
    Busy cores near the machine's count mean others were using it and the tail is theirs."""
    wall = after[0] - before[0]
    return {"busy_cores": round((after[1] - before[1]) / wall, 2),
            "bench_process_cores": round((after[2] - before[2]) / wall, 2)}


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[max(0, int(round(len(sorted_values) * fraction)) - 1)]


def measure(repeat: int, csv_rows: int) -> tuple[list[dict], dict, dict, list[str]]:
    from django.db import connection
    from django.test import Client

    client = Client()
    assert client.login(username=EMAIL, password=PASSWORD)
    log("computing the expected figures from the raw events (one aggregate, not timed)")
    figures = expected_figures()
    failures = check_paging(client, figures)
    timed = []  # (page, timings)
    for name, url, headers, expect in pages(figures):
        response = client.get(url, headers=headers)  # warm-up (template compile, connection)
        body = response.content.decode()
        missing = [text for text in expect if text not in body]
        if response.status_code != 200 or missing:
            failures.append(f"{name}: {url} answered {response.status_code} without {missing!r}")
            continue
        queries = []  # counted by a wrapper: the request cycle resets connection.queries
        with connection.execute_wrapper(lambda execute, sql, *args: queries.append(sql) or execute(sql, *args)):
            client.get(url, headers=headers)
        timed.append(({"page": name, "url": url, "headers": headers, "queries": len(queries), "bytes": len(body)},
                      []))
    # Round robin over the pages rather than one page's requests in a row, so a burst of
    # someone else's work on the shared machine lands on every page alike, not on one.
    cpu_before = cpu_sample()
    for _ in range(repeat):
        for page, timings in timed:
            started = time.perf_counter()
            client.get(page["url"], headers=page["headers"])
            timings.append((time.perf_counter() - started) * 1000)
    rows = []
    for page, timings in timed:
        timings.sort()
        rows.append({"page": page["page"], "url": page["url"], "htmx": bool(page["headers"]),
                     "held_to_target": page["url"] == "/portal/" or page["url"].startswith("/portal/usage/"),
                     "p50_ms": round(statistics.median(timings), 1), "p95_ms": round(percentile(timings, 0.95), 1),
                     "max_ms": round(timings[-1], 1), "queries": page["queries"], "bytes": page["bytes"]})
    cpu = cpu_report(cpu_before, cpu_sample())
    return rows, cpu, time_csv(client, figures, csv_rows, failures), failures


def time_csv(client, figures: dict, csv_rows: int, failures: list[str]) -> dict:
    from billing.models import UsageEvent

    day = UsageEvent.objects.filter(period=figures["period"], feature__code="images",
                                    timestamp__gte=datetime(2026, 6, 10, tzinfo=timezone.utc),
                                    timestamp__lt=datetime(2026, 6, 11, tzinfo=timezone.utc)).count()
    started = time.perf_counter()
    response = client.get("/portal/usage/events.csv?feature=images&from=2026-06-10&to=2026-06-10")
    rows = sum(chunk.count(b"\n") for chunk in response.streaming_content) - 1
    one_day = {"url": "/portal/usage/events.csv?feature=images&from=2026-06-10&to=2026-06-10", "rows": rows,
               "seconds": round(time.perf_counter() - started, 2)}
    if rows != day:
        failures.append(f"CSV of images on June 10: {rows} rows, not {day}")

    started = time.perf_counter()
    response = client.get("/portal/usage/events.csv")
    chunks, first_row_ms, read = iter(response.streaming_content), None, -1
    for chunk in chunks:
        read += chunk.count(b"\n")
        if first_row_ms is None and read >= 1:
            first_row_ms = round((time.perf_counter() - started) * 1000, 1)
        if read >= csv_rows:
            break
    seconds = time.perf_counter() - started
    response.close()
    whole = {"url": "/portal/usage/events.csv", "rows_in_period": figures["listed"], "rows_read": read,
             "first_row_ms": first_row_ms, "seconds": round(seconds, 2), "rows_per_second": round(read / seconds)}
    return {"one_feature_one_day": one_day, "whole_period": whole}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help="events in the current period (also picks the database: one per scale)")
    parser.add_argument("--service-events", type=int, default=20_000,
                        help="how many of them go through the batch service (the rest in bulk)")
    parser.add_argument("--repeat", type=int, default=50, help="timed requests per page")
    parser.add_argument("--csv-rows", type=int, default=200_000, help="rows of the whole-period CSV to read")
    parser.add_argument("--keep-db", action="store_true", help="reuse the database a previous run built")
    parser.add_argument("--build-only", action="store_true", help="build the database, time nothing")
    args = parser.parse_args()

    import time_machine

    if not args.keep_db:
        log(f"re-creating database {db_name(args.events)}")
        recreate_database(db_name(args.events))
    configure_django(args.events)
    with time_machine.travel(NOW, tick=True):
        if args.keep_db:
            from billing.models import UsageEvent

            # The events the build made (bench/freshness.py adds a few of its own).
            built = UsageEvent.objects.filter(customer__external_id=CUSTOMER, period__start=JUNE,
                                              event_id__startswith="jun-").count()
            scenario = {"events_in_period": built, "reused_database": True}
        else:
            scenario = build(args.events, args.service_events)
        if args.build_only:
            return 0
        log(f"timing {args.repeat} requests per page")
        rows, cpu, csv, failures = measure(args.repeat, args.csv_rows)

    width = max(len(r["page"]) for r in rows) if rows else 10
    print(f"\nPortal pages, {scenario['events_in_period']:,} events in the period "
          f"(server time, ms; target p95 <= {TARGET_MS})")
    print(f"{'page':<{width}}  {'p50':>7} {'p95':>7} {'max':>7} {'queries':>7}")
    for r in rows:
        print(f"{r['page']:<{width}}  {r['p50_ms']:>7} {r['p95_ms']:>7} {r['max_ms']:>7} {r['queries']:>7}"
              f"{'' if r['held_to_target'] else '   (not a dashboard or usage page)'}")
    day, whole = csv["one_feature_one_day"], csv["whole_period"]
    print(f"CSV export, one feature one day: {day['rows']:,} rows in {day['seconds']} s (streamed)")
    print(f"CSV export, whole period: first row after {whole['first_row_ms']} ms, {whole['rows_read']:,} of "
          f"{whole['rows_in_period']:,} rows read in {whole['seconds']} s ({whole['rows_per_second']:,} rows/s)")
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"machine while timing: {cpu['busy_cores']} of {os.cpu_count()} cores busy, "
          f"{cpu['bench_process_cores']} of them this process (a shared machine: the rest is the database "
          f"and other people's work)")
    # Target 6 holds the dashboard and usage pages to it; the others are timed for comparison.
    worst = max((r["p95_ms"] for r in rows if r["held_to_target"]), default=None)
    print(f"slowest dashboard or usage page p95: {worst} ms → "
          f"{'within' if worst is not None and worst <= TARGET_MS else 'OVER'} the {TARGET_MS} ms target")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    run = {
        "run_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit.stdout.strip() or None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg(),
                    "shared": True, "while_timing": cpu},
        "scenario": scenario, "repeat": args.repeat, "pages": rows, "csv_export": csv,
        "slowest_target_page_p95_ms": worst,
        "failures": failures,
    }
    # The latest run at each scale (100 000 and 10 000 000 events are both reported).
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = [r for r in previous.get("runs", []) if r["scenario"]["events_in_period"] != scenario["events_in_period"]]
    runs = sorted(runs + [run], key=lambda r: r["scenario"]["events_in_period"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "portal", "target_p95_ms": TARGET_MS, "runs": runs},
                                  indent=2, default=str) + "\n")
    log(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
