"""Portal benchmark: server time of every portal page for a customer with many events
in the period (100 000 by default).

Run from the project root:  .venv/bin/python bench/portal.py [--events 100000]
(`make bench-portal`; part of `make bench`).

What it does (about 1-2 minutes for 100 000 events, bounded):
  1. drops and re-creates the PostgreSQL database `overage_bench_portal` (nothing else is
     touched; pass --keep-db to skip the rebuild on a second run), migrates it and builds,
     through the project's own services, a customer on a tiered plan who started on
     2026-05-01: 20 000 events in May (closed: an invoice with an overage line), then
     --events events spread over June 1-20 in 1 000-event batches (ledger, rollups and
     period caches maintained exactly as the API does), a pack purchase, alerts, and four
     other customers with 10 000 events each in the same tables;
  2. freezes the clock at 2026-06-20 12:00 UTC (time-machine) so every run sees the same
     period, logs in as the customer's portal user and requests every portal page and
     htmx partial --repeat times through Django's test client in this process, DEBUG off:
     the time measured is the server's (middleware, view, queries, template), not the
     network's;
  3. prints a table (p50 / p95 / max ms and the number of SQL queries per page) and writes
     bench/results/portal.json. The target is < 100 ms per page (issue 4).

Exit status 1 if a page does not answer 200 or shows the wrong figure.
The CSV export streams every filtered event by design; it is timed separately (time to
the whole file) and not held to the page target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "portal.json"
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = "overage_bench_portal"
NOW = datetime(2026, 6, 20, 12, tzinfo=timezone.utc)
MAY, JUNE = datetime(2026, 5, 1, tzinfo=timezone.utc), datetime(2026, 6, 1, tzinfo=timezone.utc)
CUSTOMER, EMAIL, PASSWORD = "bench-portal", "owner@bench.test", "bench-portal-pw"
FEATURES = (("gpt-4o", Decimal("10")), ("embeddings", Decimal("1")), ("images", Decimal("40")))
TARGET_MS = 100


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def configure_django() -> None:
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME,
        "DEBUG": "0", "SECRET_KEY": "bench-portal-not-secret", "ALLOWED_HOSTS": "testserver",
        "LOG_LEVEL": "WARNING", "EMAIL_URL": "dummy://",
    })
    for name in ("CELERY_BROKER_URL", "REDIS_URL", "STRIPE_SECRET_KEY"):
        os.environ.pop(name, None)  # tasks eager, local invoicing
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def recreate_database() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{DB_NAME}"')


def spread_events(customer: str, count: int, start: datetime, end: datetime, prefix: str):
    """`count` events evenly over [start, end), the features in turn."""
    from billing.services.metering import EventInput

    step = (end - start) / count
    for n in range(count):
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


def build(events: int) -> dict:
    """The scenario, through the services. Returns what the pages must show."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from billing.models import BillingPeriod, CustomerMember
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
    ingested = ingest(spread_events(CUSTOMER, 20_000, MAY, JUNE, "may"), now=JUNE)
    for period in BillingPeriod.objects.filter(end=JUNE):
        close_period(period_id=period.pk, now=JUNE + timedelta(hours=2))
    ingested += ingest(spread_events(CUSTOMER, events, JUNE, NOW - timedelta(hours=1), "jun"), now=NOW)
    for other in others:
        ingested += ingest(spread_events(other.external_id, 10_000, JUNE, NOW - timedelta(hours=1),
                                         other.external_id), now=NOW)
    purchase_pack(customer=customer, pack_code="boost", idempotency_key="bench-boost", now=NOW)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # what autovacuum does after a bulk load in production
    seconds = time.perf_counter() - started
    log(f"ingested {ingested:,} events through the batch service in {seconds:.0f} s "
        f"({ingested / seconds:,.0f} events/s)")
    return {"events_in_period": events, "ingest_seconds": round(seconds, 1)}


def pages() -> list[tuple[str, str, dict, str]]:
    """(name, url, headers, text the answer must contain)."""
    from billing.models import BillingPeriod, Invoice, InvoiceLine

    may = BillingPeriod.objects.get(customer__external_id=CUSTOMER, start=MAY)
    invoice = Invoice.objects.filter(customer__external_id=CUSTOMER, period=may).first()
    overage = invoice.lines.get(kind=InvoiceLine.Kind.OVERAGE)
    htmx = {"HX-Request": "true"}
    return [
        ("dashboard", "/portal/", {}, 'id="credits-used"'),
        ("dashboard figures (htmx poll)", "/portal/", htmx, 'id="credits-used"'),
        ("usage, this period", "/portal/usage/", {}, "gpt-4o"),
        ("usage, last period", f"/portal/usage/?period={may.pk}", {}, "gpt-4o"),
        ("usage, filtered", "/portal/usage/?feature=images&start=2026-06-05&end=2026-06-15", {}, "images"),
        ("usage, events page 500", "/portal/usage/?page=500", {}, "jun-"),
        ("usage events (htmx)", "/portal/usage/?feature=gpt-4o&page=3", htmx, "jun-"),
        ("invoices", "/portal/invoices/", {}, invoice.number),
        ("invoice", f"/portal/invoices/{invoice.number}/", {}, "invoice-total"),
        ("invoice line drill-down", f"/portal/invoices/{invoice.number}/lines/{overage.pk}/", {}, "gpt-4o"),
        ("buy credits", "/portal/credits/", {}, "Boost 100k"),
        ("controls", "/portal/controls/", {}, "spend cap"),
        ("notifications", "/portal/notifications/", {}, "Notifications"),
        ("team", "/portal/team/", {}, EMAIL),
        ("change plan (confirm)", "/portal/plan/change/scale/", {}, "Scale"),
    ]


def measure(repeat: int) -> tuple[list[dict], dict, list[str]]:
    from django.db import connection
    from django.test import Client

    client = Client()
    assert client.login(username=EMAIL, password=PASSWORD)
    rows, failures = [], []
    for name, url, headers, expect in pages():
        response = client.get(url, headers=headers)  # warm-up (template compile, connection)
        body = response.content.decode()
        if response.status_code != 200 or expect not in body:
            failures.append(f"{name}: {url} answered {response.status_code} without {expect!r}")
            continue
        queries = []  # counted by a wrapper: the request cycle resets connection.queries
        with connection.execute_wrapper(lambda execute, sql, *args: queries.append(sql) or execute(sql, *args)):
            client.get(url, headers=headers)
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            client.get(url, headers=headers)
            timings.append((time.perf_counter() - started) * 1000)
        timings.sort()
        rows.append({"page": name, "url": url, "p50_ms": round(statistics.median(timings), 1),
                     "p95_ms": round(timings[max(0, int(len(timings) * 0.95) - 1)], 1),
                     "max_ms": round(timings[-1], 1), "queries": len(queries), "bytes": len(body)})
    started = time.perf_counter()
    response = client.get("/portal/usage/events.csv")
    csv_rows = sum(chunk.count(b"\n") for chunk in response.streaming_content) - 1
    csv = {"rows": csv_rows, "seconds": round(time.perf_counter() - started, 2)}
    return rows, csv, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the current period")
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per page")
    parser.add_argument("--keep-db", action="store_true", help="reuse the database a previous run built")
    args = parser.parse_args()

    import time_machine

    if not args.keep_db:
        log(f"re-creating database {DB_NAME}")
        recreate_database()
    configure_django()
    with time_machine.travel(NOW, tick=True):
        scenario = {"events_in_period": args.events, "reused_database": True} if args.keep_db else build(args.events)
        log(f"timing {args.repeat} requests per page")
        rows, csv, failures = measure(args.repeat)

    width = max(len(r["page"]) for r in rows) if rows else 10
    print(f"\nPortal pages, {args.events:,} events in the period (server time, ms; target < {TARGET_MS})")
    print(f"{'page':<{width}}  {'p50':>7} {'p95':>7} {'max':>7} {'queries':>7}")
    for r in rows:
        print(f"{r['page']:<{width}}  {r['p50_ms']:>7} {r['p95_ms']:>7} {r['max_ms']:>7} {r['queries']:>7}")
    print(f"CSV export of the whole period: {csv['rows']:,} rows in {csv['seconds']} s (streamed)")
    for failure in failures:
        print(f"FAILED {failure}")
    worst = max((r["p95_ms"] for r in rows), default=None)
    print(f"slowest page p95: {worst} ms → {'within' if worst is not None and worst < TARGET_MS else 'OVER'} "
          f"the {TARGET_MS} ms target")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "portal", "run_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                             "load_avg": os.getloadavg()},
        "scenario": scenario, "repeat": args.repeat, "target_ms": TARGET_MS, "pages": rows, "csv_export": csv,
        "slowest_p95_ms": worst, "failures": failures,
    }, indent=2) + "\n")
    log(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
