"""Period-close benchmark: N customers' finished periods closed by real Celery workers.

Run from the project root:  .venv/bin/python bench/close.py [--sizes 10000,50000,100000]

Target (issue 6): 100 000 customers with usage closed in at most 5 minutes, the time
growing linearly with the number of customers.

What it does, for each size N (bounded in time; the workers are always stopped):
  1. drops and re-creates the PostgreSQL database `overage_bench_close` (or BENCH_CLOSE_DB;
     nothing else is touched), migrates it, and creates through the project's services two features and
     a hybrid plan (base fee 49.00, 10 000 included credits, graduated overage tiers,
     rollover capped at 2 000);
  2. builds one template customer per usage profile through the services
     (`customer_create`, then `record_events` at the events' own instants, alerts and
     all): eight profiles, from 1 credit to 60 000 credits used in the period, some
     under the included credits (rollover and expiry), some in overage (every tier,
     and a sub-cent amount that rounds half-up). The period is the last full calendar
     month before now (UTC): the workers close with the real clock, as in production;
  3. copies the templates' rows (customer, subscription, period, grant, events, ledger
     entries, rollups, subscription-start invoice, alerts, notifications) in bulk with
     INSERT … SELECT … generate_series up to N customers, ids, external ids, idempotency
     keys, event fingerprints and gap-free invoice numbers rewritten; VACUUM ANALYZE;
  4. verifies the build: `manage.py ledger_check` passes, and for a sample of copies every
     row equals its template's (ids and keys mapped, fingerprints recomputed);
  5. in-process: closes one chunk of copies as a worker would (`close_periods`), counting
     its SQL statements per close, and rolls it back; then closes the templates one at a
     time through `close_period`, the one-period close: the reference invoices;
  6. starts `celery worker --pool prefork --concurrency W` on a dedicated Redis database
     (BENCH_CLOSE_REDIS_DB, default 11), sends `billing.tasks.close_due_periods_task` by
     name as celery-beat does, and measures the wall time until every period is closed;
  7. verifies: every period closed with exactly one close invoice, invoice numbers
     gap-free, `ledger_check` passes, and for a sample of customers the workers' chunk
     close produced exactly the rows the template's one-period close produced (invoice
     lines to the cent, rollover and expiry, next period) and the invoice total expected
     for its profile.

Prints a table (seconds, periods/s, seconds per 1 000 periods and its ratio to the
smallest size) and writes bench/results/close.json. Exit status 1 if anything is wrong.
`--profile` closes in this process under cProfile instead of the workers (no results
file): where the time of one close goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from bench_support import PG_ADMIN_URL, ROOT, git, log, machine_busy_ticks, process_cpu_ticks
from bench_support import recreate_database as recreate_scratch_database

RESULTS = ROOT / "bench" / "results" / "close.json"
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent
# BENCH_CLOSE_DB: another scratch database, so that two runs at once do not drop each other's.
DB_NAME = os.environ.get("BENCH_CLOSE_DB", "overage_bench_close")
DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
REDIS_DB = int(os.environ.get("BENCH_CLOSE_REDIS_DB", "11"))
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
SECRET_KEY = "bench-close-not-secret"
TARGET_SECONDS, TARGET_SIZE = 300, 100_000

FEATURES = (("api", "API call", Decimal("1")), ("gpt", "LLM call", Decimal("10")))
PLAN = "hybrid"
BASE_FEE = Decimal("49.00")
# Usage profiles: (name, [(feature, quantity, day of the period, hour)], expected close
# invoice total = next period's base fee + overage through the tiers, rounded once).
# Overage tiers: the first 5 000 overage credits at 0.002, the next 20 000 at 0.0015,
# the rest at 0.001; 10 000 credits included; up to 2 000 unused ones roll over.
PROFILES = [
    ("light: 2 500 of 10 000", [("api", "1500", 3, 9), ("gpt", "100", 17, 14)], Decimal("49.00")),
    ("most: 9 000", [("api", "4000", 2, 8), ("gpt", "400", 12, 11), ("api", "1000", 25, 16)], Decimal("49.00")),
    ("exactly the included 10 000", [("gpt", "600", 5, 10), ("api", "4000", 20, 18)], Decimal("49.00")),
    ("overage 2 345", [("api", "8000", 4, 7), ("gpt", "434.5", 19, 13)], Decimal("53.69")),
    ("overage 8 000 (two tiers)", [("gpt", "1000", 10, 12), ("api", "8000", 22, 9)], Decimal("63.50")),
    # 23 333.333 overage credits: 10 + 27.4999995 = 37.4999995 → 37.50, rounded once.
    ("overage 23 333.333 (sub-cent)", [("api", "3333.333", 6, 15), ("gpt", "3000", 26, 20)], Decimal("86.50")),
    ("overage 50 000 (three tiers)", [("gpt", "2500", 1, 6), ("gpt", "2500", 15, 12), ("api", "10000", 28, 22)],
     Decimal("114.00")),
    ("tiny: 1 credit", [("api", "1", 14, 12)], Decimal("49.00")),
]

# Tables holding a customer's rows, in insertion order, with the foreign keys to other
# copied rows (column → table). Columns not listed are copied as they are.
OWNED = [
    ("billing_customer", {}),
    ("billing_subscription", {"customer_id": "billing_customer"}),
    ("billing_billingperiod", {"subscription_id": "billing_subscription", "customer_id": "billing_customer"}),
    ("billing_creditgrant", {"customer_id": "billing_customer", "period_id": "billing_billingperiod"}),
    ("billing_usageevent", {"customer_id": "billing_customer", "period_id": "billing_billingperiod"}),
    ("billing_ledgerentry", {"customer_id": "billing_customer", "grant_id": "billing_creditgrant",
                             "period_id": "billing_billingperiod", "event_id": "billing_usageevent"}),
    ("billing_invoice", {"customer_id": "billing_customer", "subscription_id": "billing_subscription",
                         "period_id": "billing_billingperiod"}),
    ("billing_invoiceline", {"invoice_id": "billing_invoice", "period_id": "billing_billingperiod",
                             "through_entry_id": "billing_ledgerentry"}),
    ("billing_usagerollup", {"period_id": "billing_billingperiod"}),
    ("billing_alert", {"customer_id": "billing_customer", "period_id": "billing_billingperiod"}),
    ("billing_notification", {"customer_id": "billing_customer", "alert_id": "billing_alert"}),
]
# Which rows of a table belong to customer %(c)s.
OWNERSHIP = {
    "billing_customer": "id = %(c)s",
    "billing_invoiceline": "invoice_id IN (SELECT id FROM billing_invoice WHERE customer_id = %(c)s)",
    "billing_usagerollup": "period_id IN (SELECT id FROM billing_billingperiod WHERE customer_id = %(c)s)",
}
# Keys that embed an id of one of the customer's rows.
KEY_PATTERNS = {"included:period": "billing_billingperiod", "rollover:grant": "billing_creditgrant",
                "subscription-start": "billing_subscription"}
# Columns that legitimately differ between a copy and its template after the close:
# the instants of the close itself (the templates close in this process, the copies in
# the workers, at other moments).
CLOSE_INSTANTS = {"created_at", "issued_at", "due_at", "paid_at", "closed_at"}


def external_id(index: int) -> str:
    return f"bench-{index:07d}"


def finished_period(now: datetime) -> tuple[datetime, datetime]:
    """The last calendar month that ended, grace window included, before `now` (UTC): the
    workers close with the real clock, and the period after it must not be due yet, or
    every customer would close two periods."""
    end = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if now < end + timedelta(hours=2):  # the default grace is one hour; keep a margin
        end = (end - timedelta(days=1)).replace(day=1)
    start = (end - timedelta(days=1)).replace(day=1)
    return start, end


# --- Django in this process ---------------------------------------------------------------

def app_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STRIPE_SECRET_KEY", "STRIPE_API_BASE")}
    env.update({
        "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": DB_URL, "DEBUG": "0",
        "SECRET_KEY": SECRET_KEY, "ALLOWED_HOSTS": "localhost", "LOG_LEVEL": "WARNING", "EMAIL_URL": "dummy://",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def configure_django() -> None:
    """This process: embedded mode (tasks in-process) on the benchmark database."""
    os.environ.update(app_env())
    for name in ("CELERY_BROKER_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def recreate_database() -> None:
    from django.db import connection

    connection.close()
    recreate_scratch_database(DB_NAME)


def table_counts() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        tables = [row[0] for row in cursor.fetchall()]
        counts = {}
        for table in tables:
            cursor.execute(f'SELECT count(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    return counts


# --- Building: templates through the services, copies in bulk ------------------------------

def build_templates(start: datetime) -> list[int]:
    """The catalogue and one customer per profile, through the services. Returns the
    template customers' ids, in profile order."""
    from django.core.management import call_command

    from billing.models import Customer
    from billing.services.customers import customer_create
    from billing.services.metering import EventInput, record_events
    from plans.models import Plan
    from plans.services import TierInput, feature_create, plan_create

    call_command("migrate", verbosity=0)
    for code, name, credits in FEATURES:
        feature_create(code=code, name=name, default_credits_per_unit=credits)
    plan_create(code=PLAN, name="Hybrid", base_price=BASE_FEE, included_credits=Decimal("10000"),
                overage_enabled=True, overage_tiers=[TierInput(Decimal("5000"), Decimal("0.002")),
                                                     TierInput(Decimal("25000"), Decimal("0.0015")),
                                                     TierInput(None, Decimal("0.001"))],
                rollover_policy=Plan.Rollover.CAPPED, rollover_max_credits=Decimal("2000"),
                feature_costs={code: credits for code, _, credits in FEATURES})
    before = table_counts()
    ids = []
    for index, (name, usage, _) in enumerate(PROFILES):
        customer = customer_create(external_id=external_id(index), name=f"Bench customer ({name})",
                                   email=f"billing+{index % len(PROFILES)}@bench.test", plan_code=PLAN,
                                   started_at=start, now=start)
        for number, (feature, quantity, day, hour) in enumerate(usage):
            at = start + timedelta(days=day - 1, hours=hour)
            record_events(events=[EventInput(event_id=f"evt-{number}", customer=customer.external_id,
                                             feature=feature, quantity=Decimal(quantity), timestamp=at)],
                          now=at + timedelta(minutes=1))
        ids.append(customer.pk)
    after = table_counts()
    copied = {table for table, _ in OWNED}
    unexpected = {t: after[t] - before.get(t, 0) for t in after
                  if after[t] != before.get(t, 0) and t not in copied | {"billing_invoicenumbersequence"}}
    if unexpected:
        raise RuntimeError(f"the services wrote rows the copier does not know how to copy: {unexpected}")
    assert Customer.objects.count() == len(PROFILES)
    return ids


def owned_ids(cursor, table: str, customer_id: int) -> list[int]:
    where = OWNERSHIP.get(table, "customer_id = %(c)s")
    cursor.execute(f"SELECT id FROM {table} WHERE {where} ORDER BY id", {"c": customer_id})
    return [row[0] for row in cursor.fetchall()]


def table_columns(cursor, table: str) -> list[str]:
    cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                   "ORDER BY ordinal_position", [table])
    return [row[0] for row in cursor.fetchall()]


def copy_profile(cursor, profile: int, template_id: int, copies: int) -> None:
    """`copies` copies of one template customer's rows, in one INSERT … SELECT per table.

    Copy k (0-based) of profile p is customer index p + P·(k + 1). Its row of rank r
    (1-based, in id order, among the template's rows of that table) gets id
    base + k·count + r, so every copy's rows keep the template's relative order, and a
    foreign key to another copied row is mapped with the same formula."""
    from django.conf import settings

    from billing.models import UsageEvent
    from billing.services.metering import EventInput

    profiles = len(PROFILES)
    index_sql = f"({profile} + {profiles} * (k + 1))"
    external_sql = f"('bench-' || lpad({index_sql}::text, 7, '0'))"
    base, count = {}, {}
    for table, foreign in OWNED:
        ids = owned_ids(cursor, table, template_id)
        if not ids:
            continue
        cursor.execute(f"DROP TABLE IF EXISTS map_{table}")
        cursor.execute(f"CREATE TEMP TABLE map_{table} (old_id bigint PRIMARY KEY, rank bigint NOT NULL)")
        cursor.execute(f"INSERT INTO map_{table} SELECT old_id, rank FROM unnest(%s::bigint[]) WITH ORDINALITY "
                       "AS u(old_id, rank)", [ids])
        cursor.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}")
        base[table], count[table] = cursor.fetchone()[0], len(ids)

        def new_id(target: str, column: str) -> str:
            return f"({base[target]} + k * {count[target]} + m_{column}.rank)"

        joins, expressions = [], {}
        for column, target in foreign.items():
            if target not in base:
                expressions[column] = f"t.{column}"
                continue
            joins.append(f"LEFT JOIN map_{target} m_{column} ON m_{column}.old_id = t.{column}")
            expressions[column] = f"CASE WHEN t.{column} IS NULL THEN NULL ELSE {new_id(target, column)} END"
            # A reference out of the template's own rows would be copied as NULL: refuse.
            cursor.execute(f"SELECT count(*) FROM {table} t JOIN map_{table} m ON m.old_id = t.id "
                           f"LEFT JOIN map_{target} x ON x.old_id = t.{column} "
                           f"WHERE t.{column} IS NOT NULL AND x.old_id IS NULL")
            if cursor.fetchone()[0]:
                raise RuntimeError(f"{table}.{column} points outside the template's rows")
        expressions["id"] = f"({base[table]} + k * {count[table]} + m.rank)"
        if table == "billing_customer":
            expressions["external_id"] = external_sql
        if table == "billing_creditgrant":
            expressions["idempotency_key"] = (
                "CASE WHEN t.idempotency_key = 'included:period:' || t.period_id "
                f"THEN 'included:period:' || {expressions['period_id']} ELSE t.idempotency_key END")
        if table == "billing_invoice":
            cursor.execute("SELECT last_value FROM billing_invoicenumbersequence WHERE name = 'invoice'")
            sequence = cursor.fetchone()[0]
            number = f"({sequence} + k * {count[table]} + m.rank)"
            expressions["number"] = (f"'{settings.OVERAGE_INVOICE_PREFIX}-' || CASE WHEN {number} < 1000000 "
                                     f"THEN lpad({number}::text, 6, '0') ELSE {number}::text END")
            expressions["idempotency_key"] = (
                "CASE WHEN t.idempotency_key = 'subscription-start:' || t.subscription_id "
                f"THEN 'subscription-start:' || {expressions['subscription_id']} ELSE t.idempotency_key END")
        if table == "billing_usageevent":
            # The fingerprint hashes the request as sent, customer included: the JSON
            # is canonical (sorted keys, "customer" first), so only its head changes.
            cursor.execute("CREATE TEMP TABLE IF NOT EXISTS fingerprint_tail (old_id bigint PRIMARY KEY, tail text)")
            cursor.execute("TRUNCATE fingerprint_tail")
            for event in UsageEvent.objects.filter(pk__in=ids).select_related("feature", "customer"):
                if event.reservation_id is not None:
                    raise RuntimeError("template events must not settle reservations")
                canonical = EventInput(event_id=event.event_id, customer=event.customer.external_id,
                                       feature=event.feature.code, quantity=event.quantity,
                                       timestamp=event.timestamp, properties=event.properties)
                blob = json.dumps({
                    "customer": canonical.customer, "feature": canonical.feature,
                    "quantity": format(canonical.quantity.normalize(), "f"),
                    "timestamp": canonical.timestamp.isoformat(), "properties": canonical.properties,
                    "reservation_id": None}, sort_keys=True, separators=(",", ":"), default=str)
                import hashlib

                if hashlib.sha256(blob.encode()).hexdigest() != event.fingerprint:
                    raise RuntimeError("cannot reproduce a template event's fingerprint")
                head = '{"customer":' + json.dumps(canonical.customer)
                assert blob.startswith(head)
                cursor.execute("INSERT INTO fingerprint_tail VALUES (%s, %s)", [event.pk, blob[len(head):]])
            joins.append("JOIN fingerprint_tail fp ON fp.old_id = t.id")
            expressions["fingerprint"] = (f"encode(sha256(convert_to('{{\"customer\":\"' || {external_sql} || '\"' "
                                          "|| fp.tail, 'UTF8')), 'hex')")
        columns = table_columns(cursor, table)
        select = ", ".join(expressions.get(column, f't."{column}"') for column in columns)
        quoted = ", ".join(f'"{column}"' for column in columns)
        cursor.execute(
            f"INSERT INTO {table} ({quoted}) SELECT {select} FROM {table} t "
            f"JOIN map_{table} m ON m.old_id = t.id CROSS JOIN generate_series(0, {copies - 1}) AS k "
            f"{' '.join(joins)} ORDER BY k, m.rank")
        if table == "billing_invoice":
            cursor.execute("UPDATE billing_invoicenumbersequence SET last_value = last_value + %s "
                           "WHERE name = 'invoice'", [copies * count[table]])


def build(size: int, start: datetime) -> dict:
    from django.db import connection, transaction

    started = time.perf_counter()
    templates = build_templates(start)
    services_s = time.perf_counter() - started
    copy_started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        for profile, template_id in enumerate(templates):
            copies = len(range(profile + len(PROFILES), size, len(PROFILES)))
            if copies:
                copy_profile(cursor, profile, template_id, copies)
        for table, _ in OWNED:
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                           f"(SELECT coalesce(max(id), 1) FROM {table}))")
    copy_s = time.perf_counter() - copy_started
    connection.close()
    import psycopg

    with psycopg.connect(DB_URL, autocommit=True) as raw:
        raw.execute("VACUUM ANALYZE")  # what autovacuum does after a bulk load
    rows = {table: count for table, count in table_counts().items() if table in dict(OWNED)}
    return {"templates": templates, "services_s": round(services_s, 1), "copy_s": round(copy_s, 1),
            "total_s": round(time.perf_counter() - started, 1), "rows": rows}


# --- Verifying -------------------------------------------------------------------------------

def ledger_check() -> str | None:
    """None if `manage.py ledger_check` passes, else its complaint."""
    proc = subprocess.run([PYTHON, "manage.py", "ledger_check"], cwd=ROOT, env=app_env(), capture_output=True,
                          text=True, timeout=900)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-2000:]


def snapshot(customer_id: int, *, ignore: frozenset = frozenset()) -> dict:
    """Every row of one customer, normalised so that a copy and its template compare
    equal: ids become ranks (per table, in id order), foreign keys the rank of their
    target, keys that embed ids the same; external id, invoice numbers and fingerprints
    are checked elsewhere."""
    from django.db import connection

    from billing.models import UsageEvent
    from billing.services.metering import EventInput

    rows_by_table, rank = {}, {}
    with connection.cursor() as cursor:
        for table, _ in OWNED:
            where = OWNERSHIP.get(table, "customer_id = %(c)s")
            cursor.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY id", {"c": customer_id})
            names = [d.name for d in cursor.description]
            rows_by_table[table] = [dict(zip(names, row)) for row in cursor.fetchall()]
            rank[table] = {row["id"]: n for n, row in enumerate(rows_by_table[table], 1)}
    problems = []
    for event in UsageEvent.objects.filter(customer_id=customer_id).select_related("customer", "feature"):
        expected = EventInput(event_id=event.event_id, customer=event.customer.external_id, feature=event.feature.code,
                              quantity=event.quantity, timestamp=event.timestamp,
                              properties=event.properties).fingerprint()
        if expected != event.fingerprint:
            problems.append(f"event {event.event_id} of customer {customer_id}: fingerprint differs from the request's")
    normalised = {"problems": problems}
    for table, foreign in OWNED:
        out = []
        for row in rows_by_table[table]:
            item = {}
            for column, value in row.items():
                if column in ignore or column in ("external_id", "number", "fingerprint"):
                    continue
                if column == "id":
                    value = rank[table][value]
                elif column in foreign and value is not None:
                    value = ("rank", rank[foreign[column]].get(value, f"foreign {value}"))
                elif column == "idempotency_key" and value:
                    prefix, _, number = value.rpartition(":")
                    if prefix in KEY_PATTERNS and number.isdigit():
                        value = (prefix, rank[KEY_PATTERNS[prefix]].get(int(number), f"foreign {number}"))
                item[column] = value
            out.append(item)
        normalised[table] = out
    return normalised


def compare(label: str, template: dict, copy: dict, failures: list[str]) -> None:
    failures.extend(copy["problems"] + template["problems"])
    for table, _ in OWNED:
        if template[table] != copy[table]:
            a, b = template[table], copy[table]
            detail = f"{len(a)} vs {len(b)} rows"
            for x, y in zip(a, b):
                if x != y:
                    detail = "; ".join(f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in sorted(set(x) | set(y))
                                       if x.get(k) != y.get(k))
                    break
            failures.append(f"{label}: {table} differs from the template's ({detail[:500]})")


def sample_indexes(size: int, per_profile: int, seed: int) -> list[int]:
    """Copies to check: the first, the last and random ones of each profile."""
    rng = random.Random(seed)
    profiles = len(PROFILES)
    chosen = []
    for profile in range(profiles):
        indexes = range(profile + profiles, size, profiles)
        if not indexes:
            continue
        picks = {indexes[0], indexes[-1]} | set(rng.sample(list(indexes), min(per_profile, len(indexes))))
        chosen += sorted(picks)
    return chosen


def customer_pk(index: int) -> int:
    from billing.models import Customer

    return Customer.objects.values_list("pk", flat=True).get(external_id=external_id(index))


def verify_build(size: int, templates: list[int], samples: int) -> list[str]:
    failures = []
    complaint = ledger_check()
    if complaint:
        failures.append(f"ledger_check after the build: {complaint}")
    reference = [snapshot(t) for t in templates]
    for index in sample_indexes(size, samples, seed=size):
        compare(f"copy {external_id(index)}", reference[index % len(PROFILES)], snapshot(customer_pk(index)), failures)
    return failures


def verify_close(size: int, start: datetime, templates: list[int], samples: int) -> tuple[list[str], dict]:
    from django.db import connection

    from billing.models import Invoice
    from plans.models import Plan
    from plans.pricing import price_overage

    failures = []
    with connection.cursor() as cursor:
        cursor.execute("SELECT status, count(*) FROM billing_billingperiod WHERE start = %s GROUP BY status", [start])
        statuses = dict(cursor.fetchall())
        if statuses != {"closed": size}:
            failures.append(f"periods of the closed month by status: {statuses}, expected {{'closed': {size}}}")
        cursor.execute("SELECT count(*) FROM billing_billingperiod WHERE start > %s AND status <> 'open'", [start])
        if cursor.fetchone()[0]:
            failures.append("a period after the closed month was closed too")
        cursor.execute("SELECT count(*) FROM billing_billingperiod WHERE start > %s", [start])
        if cursor.fetchone()[0] != size:
            failures.append("not every customer has exactly one next period")
        cursor.execute("""
            SELECT count(*) FROM billing_billingperiod p
            WHERE p.status = 'closed' AND (SELECT count(*) FROM billing_invoice i
                                           WHERE i.period_id = p.id AND i.kind = 'period_close') <> 1""")
        wrong = cursor.fetchone()[0]
        if wrong:
            failures.append(f"{wrong} closed periods do not have exactly one close invoice")
        cursor.execute("SELECT count(*), count(DISTINCT number), max(substring(number FROM '[0-9]+$')::bigint) "
                       "FROM billing_invoice")
        invoices, distinct, highest = cursor.fetchone()
        cursor.execute("SELECT last_value FROM billing_invoicenumbersequence WHERE name = 'invoice'")
        last = cursor.fetchone()[0]
        if not (invoices == distinct == highest == last):
            failures.append(f"invoice numbers are not gap-free: {invoices} invoices, {distinct} numbers, "
                            f"highest {highest}, sequence at {last}")
        cursor.execute("SELECT total, count(*) FROM billing_invoice WHERE kind = 'period_close' GROUP BY total "
                       "ORDER BY total")
        totals = {str(total): n for total, n in cursor.fetchall()}
    complaint = ledger_check()
    if complaint:
        failures.append(f"ledger_check after the close: {complaint}")

    plan = Plan.objects.get(code=PLAN)
    for profile, (name, usage, expected) in enumerate(PROFILES):
        credits = sum(Decimal(q) * dict((c, k) for c, _, k in FEATURES)[f] for f, q, _, _ in usage)
        priced = BASE_FEE + price_overage(plan, max(credits - plan.included_credits, Decimal(0))).amount
        if priced != expected:
            failures.append(f"profile {name!r}: pricing says {priced}, the benchmark expects {expected}")
    reference = [snapshot(t, ignore=frozenset(CLOSE_INSTANTS)) for t in templates]
    checked = 0
    for index in list(range(len(PROFILES))) + sample_indexes(size, samples, seed=size + 1):
        pk = customer_pk(index)
        invoice = Invoice.objects.get(customer_id=pk, kind="period_close")
        expected = PROFILES[index % len(PROFILES)][2]
        if invoice.total != expected:
            failures.append(f"{external_id(index)}: close invoice total {invoice.total}, expected {expected}")
        if index >= len(PROFILES):
            compare(f"closed copy {external_id(index)}", reference[index % len(PROFILES)],
                    snapshot(pk, ignore=frozenset(CLOSE_INSTANTS)), failures)
        checked += 1
    return failures, {"invoice_totals": totals, "customers_compared_with_their_template": checked}


# --- Closing ---------------------------------------------------------------------------------

def close_templates(templates: list[int], start: datetime) -> dict:
    """Two things in this process before the workers start.

    The statements of one chunk as a worker closes it (`close_periods` on the first
    OVERAGE_CLOSE_CHUNK_PERIODS due periods, in batches), counted and then rolled back,
    so the workers still close every period; savepoints, which only the roll-back adds,
    are not counted.

    Then the template customers' periods closed one at a time by `close_period` (the
    one-period close, about 14 statements each): the reference the workers' invoices
    are compared with, so the check is that a chunk writes exactly the rows the
    one-period close writes."""
    from django.conf import settings
    from django.db import connection, transaction
    from django.utils import timezone as dj_timezone

    from billing.models import BillingPeriod
    from billing.services.invoicing import close_period, close_periods, due_period_ids

    class RollBack(Exception):
        pass

    def counting(sink):
        return lambda execute, sql, *args: (
            None if sql.startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")) else sink.append(sql)
        ) or execute(sql, *args)

    template_periods = set(BillingPeriod.objects.filter(customer_id__in=templates).values_list("pk", flat=True))
    chunk = [pk for pk in due_period_ids(now=dj_timezone.now())
             if pk not in template_periods][:settings.OVERAGE_CLOSE_CHUNK_PERIODS]
    in_chunk = []
    started, cpu = time.perf_counter(), time.process_time()
    try:
        with transaction.atomic(), connection.execute_wrapper(counting(in_chunk)):
            closed = len(close_periods(period_ids=chunk, now=dj_timezone.now()))
            raise RollBack
    except RollBack:
        pass
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert closed == len(chunk), f"{closed} of a chunk of {len(chunk)} closed"

    periods = [BillingPeriod.objects.get(customer_id=customer_id, start=start).pk for customer_id in templates]
    alone = []
    with connection.execute_wrapper(counting(alone)):
        for period_id in periods:
            close_period(period_id=period_id, now=dj_timezone.now())
    return {"queries_per_close": round(len(in_chunk) / closed, 2),
            "ms_per_close_in_process": round(wall * 1000 / closed, 2),
            "cpu_ms_per_close_in_process": round(cpu * 1000 / closed, 2),
            "chunk_periods": closed,
            "queries_per_close_alone": round(len(alone) / len(periods), 1)}


def profile_close(start: datetime, limit: int) -> None:
    """Close in this process: the first half of the periods plainly, measuring CPU time
    here and in PostgreSQL's backend per close; the rest under cProfile, printing where
    the time went and the SQL statements of a close."""
    from django.db import connection
    from django.utils import timezone as dj_timezone

    from billing.services import invoicing

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    period_ids = invoicing.due_period_ids(now=dj_timezone.now())
    half = len(period_ids) // 2
    started, cpu, db = time.perf_counter(), time.process_time(), cpu_ticks([backend])
    invoicing.close_periods(period_ids=period_ids[:half], now=dj_timezone.now())
    wall, cpu, db = time.perf_counter() - started, time.process_time() - cpu, cpu_ticks([backend]) - db
    log(f"closed {half:,} periods in this process in {wall:.1f} s: per close {wall * 1000 / half:.2f} ms wall, "
        f"{cpu * 1000 / half:.2f} ms CPU here, {db / CLK_TCK * 1000 / half:.2f} ms CPU in PostgreSQL "
        f"(load average {os.getloadavg()[0]:.1f})")

    queries = []
    profiler = cProfile.Profile()
    rest = period_ids[half:]
    with connection.execute_wrapper(lambda execute, sql, *args: queries.append(sql) or execute(sql, *args)):
        profiler.enable()
        invoices = invoicing.close_periods(period_ids=rest, now=dj_timezone.now())
        profiler.disable()
    closed = max(len(invoices), 1)
    log(f"closed {len(invoices):,} more under cProfile, {len(queries) / closed:.1f} queries per close")
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(limit)
        print(out.getvalue())
    shapes: dict[str, int] = {}
    for sql in queries:
        shape = re.sub(r"\b\d+\b", "N", re.sub(r"'[^']*'", "'…'", sql))[:160]
        shapes[shape] = shapes.get(shape, 0) + 1
    print("queries per close, by statement:")
    for shape, n in sorted(shapes.items(), key=lambda item: -item[1])[:30]:
        print(f"  {n / closed:6.2f}  {shape}")


def redis_ready() -> None:
    """The dedicated Redis database (broker and cache of the workers) holds nothing but
    what an earlier run left: Celery's keys and Overage's cache keys."""
    import redis

    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2)
    keys = [k.decode() for k in client.keys("*")]
    foreign = [k for k in keys
               if not re.match(r"^(celery|unacked|unacked_index|unacked_mutex|_kombu\..*|:\d+:overage:.*)$", k)]
    if foreign:
        raise RuntimeError(f"Redis database {REDIS_DB} is in use by something else ({foreign[:5]}); "
                           "set BENCH_CLOSE_REDIS_DB to a free one")
    if keys:
        client.delete(*keys)  # a previous run's leftovers


class Worker:
    """`celery worker` (prefork) in its own session, stopped whatever happens."""

    def __init__(self, concurrency: int):
        self.log = tempfile.NamedTemporaryFile(prefix="overage-bench-close-worker-", suffix=".log", delete=False)
        env = app_env()
        env.update({"CELERY_BROKER_URL": BROKER_URL, "REDIS_URL": BROKER_URL, "DB_CONN_MAX_AGE": "600"})
        self.name = f"bench-close-{os.getpid()}@localhost"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "config", "worker", "--pool", "prefork", "--concurrency",
             str(concurrency), "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip",
             "--without-mingle", "-n", self.name],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, app, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {self.proc.returncode}:\n{self.tail()}")
            if app.control.ping(destination=[self.name], timeout=1.0):
                return
        raise RuntimeError(f"the worker did not answer a ping within {timeout:.0f} s:\n{self.tail()}")

    def pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return [self.proc.pid, *map(int, children)]

    def tail(self, chars: int = 4000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session started for this worker
                self.proc.wait(timeout=10)
        self.log.close()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids) -> int:
    return sum(process_cpu_ticks(pid) or 0 for pid in pids)


def run_close(size: int, start: datetime, concurrency: int, timeout: float) -> dict:
    """Start the workers, send the beat task, wait until every period is closed."""
    import psycopg
    from celery import Celery
    from django.conf import settings
    from django.db import connection

    connection.close()  # this process's session must not hold anything
    redis_ready()
    worker = Worker(concurrency)
    task = settings.CELERY_BEAT_SCHEDULE["close-due-periods"]["task"]
    try:
        with Celery("bench-close-probe", broker=BROKER_URL, set_as_current=False) as probe:
            worker.wait_ready(probe)
            log(f"worker ready ({concurrency} processes); sending {task}")
            worker_pids = worker.pids()
            with psycopg.connect(DB_URL, autocommit=True) as db:
                # PostgreSQL's share: CPU of the backends serving the workers, read from
                # /proc at every poll (their connections persist: DB_CONN_MAX_AGE).
                backends_sql = ("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
                                "AND backend_type = 'client backend'")
                db_baseline = {pid: cpu_ticks([pid]) for (pid,) in db.execute(backends_sql, (DB_NAME,))}
                db_last = dict(db_baseline)
                before = {"machine": machine_busy_ticks(), "worker": cpu_ticks(worker_pids)}
                sent_at = datetime.now(timezone.utc)
                t0 = time.perf_counter()
                probe.send_task(task)
                closed = 0
                while True:
                    time.sleep(0.5)  # waiting on other processes
                    closed = db.execute("SELECT count(*) FROM billing_billingperiod WHERE start = %s "
                                        "AND status = 'closed'", (start,)).fetchone()[0]
                    for (pid,) in db.execute(backends_sql, (DB_NAME,)).fetchall():
                        db_last[pid] = cpu_ticks([pid]) or db_last.get(pid, 0)
                    if closed >= size:
                        break
                    if worker.proc.poll() is not None:
                        raise RuntimeError(f"the worker died:\n{worker.tail()}")
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"only {closed:,} of {size:,} periods closed after {timeout:.0f} s")
                polled_s = time.perf_counter() - t0
                last_invoice = db.execute("SELECT max(created_at) FROM billing_invoice WHERE kind = 'period_close' "
                                          "AND created_at >= %s", (sent_at,)).fetchone()[0]
                after = {"machine": machine_busy_ticks(), "worker": cpu_ticks(worker_pids)}
                for (pid,) in db.execute(backends_sql, (DB_NAME,)).fetchall():
                    db_last[pid] = cpu_ticks([pid]) or db_last.get(pid, 0)
    finally:
        worker.stop()
    seconds = (last_invoice - sent_at).total_seconds()
    tail = worker.tail()
    errors = [line for line in tail.splitlines() if "ERROR" in line or "Traceback" in line]
    worker_cpu = (after["worker"] - before["worker"]) / CLK_TCK
    db_cpu = sum(ticks - db_baseline.get(pid, 0) for pid, ticks in db_last.items()) / CLK_TCK
    machine_cpu = (after["machine"] - before["machine"]) / CLK_TCK
    return {
        "seconds": round(seconds, 2), "seconds_polled": round(polled_s, 1),
        "periods_per_s": round(size / seconds, 1),
        "cpu_cores_busy": {"workers": round(worker_cpu / polled_s, 2), "postgresql": round(db_cpu / polled_s, 2),
                           "machine": round(machine_cpu / polled_s, 2)},
        # Per close: what the close itself costs, whatever else ran on the machine.
        "cpu_ms_per_close": {"workers": round(worker_cpu * 1000 / size, 2),
                             "postgresql": round(db_cpu * 1000 / size, 2)},
        # Cores the close could not have: busy with other work while it ran.
        "other_work_cores": round(max(machine_cpu - worker_cpu - db_cpu, 0) / polled_s, 2),
        "worker_log_errors": errors[:10],
    }


# --- Main ------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,100000",
                        help="comma-separated numbers of customers, each built and closed afresh")
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes (prefork concurrency)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on one size's close after this many seconds")
    parser.add_argument("--samples", type=int, default=20, help="random copies per profile compared row by row")
    parser.add_argument("--profile", action="store_true",
                        help="close in this process under cProfile instead of the workers; no results file")
    parser.add_argument("--build-only", action="store_true",
                        help="build and verify the (last) size's database, close nothing; no results file")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if any(size < len(PROFILES) for size in sizes):
        parser.error(f"every size must be at least {len(PROFILES)} (one customer per profile)")

    configure_django()
    started_at = datetime.now(timezone.utc)
    load_at_start = os.getloadavg()
    start, end = finished_period(started_at)
    log(f"closing the period {start:%Y-%m-%d} – {end:%Y-%m-%d} (the last month that ended)")
    failures: list[str] = []
    runs = []
    for size in sizes:
        log(f"--- {size:,} customers: re-creating database {DB_NAME}")
        recreate_database()
        built = build(size, start)
        log(f"built {size:,} customers in {built['total_s']} s ({built['services_s']} s through the services for "
            f"{len(PROFILES)} templates, {built['copy_s']} s copying); rows: "
            + ", ".join(f"{t.removeprefix('billing_')} {n:,}" for t, n in built["rows"].items()))
        problems = verify_build(size, built["templates"], args.samples)
        failures += [f"{size:,}: {p}" for p in problems]
        if problems:
            log(f"the build is wrong ({len(problems)} problems); not closing")
            continue
        log("build verified: ledger_check passes, sampled copies equal their templates")
        if args.build_only:
            continue
        if args.profile:
            profile_close(start, limit=40)
            continue
        reference = close_templates(built["templates"], start)
        log(f"a chunk of {reference['chunk_periods']} periods closed in-process (rolled back): "
            f"{reference['queries_per_close']} queries and {reference['cpu_ms_per_close_in_process']} ms CPU "
            f"per close; templates closed one at a time: {reference['queries_per_close_alone']} queries per close")
        try:
            measured = run_close(size, start, args.workers, args.timeout)
        except RuntimeError as error:
            failures.append(f"{size:,}: {error}")
            log(f"close failed: {str(error)[:2000]}")
            continue
        failures += [f"{size:,}: worker log: {line}" for line in measured["worker_log_errors"]]
        log(f"closed {size:,} periods in {measured['seconds']} s ({measured['periods_per_s']:,} periods/s); verifying")
        problems, checked = verify_close(size, start, built["templates"], args.samples)
        failures += [f"{size:,}: {p}" for p in problems]
        runs.append({"customers": size, "periods": size, **measured, **reference, **checked,
                     "build": {k: v for k, v in built.items() if k != "templates"}, "verified": not problems})
    if args.profile or args.build_only:
        return 1 if failures else 0

    smallest = runs[0] if runs else None
    for run in runs:
        run["seconds_per_1000_periods"] = round(run["seconds"] * 1000 / run["periods"], 2)
        run["per_period_time_vs_smallest"] = round(
            (run["seconds"] / run["periods"]) / (smallest["seconds"] / smallest["periods"]), 2)
    target = next((r for r in runs if r["customers"] == TARGET_SIZE), None)
    commit = git("rev-parse", "--short", "HEAD")
    print(f"\nPeriod close, {args.workers} celery worker processes on Redis, PostgreSQL; commit {commit}, "
          f"{os.cpu_count()} cores (shared), load average at start {load_at_start[0]:.2f}")
    print(f"{'customers':>10} {'seconds':>9} {'periods/s':>10} {'s per 1k':>9} {'× smallest':>11} "
          f"{'queries/close':>14} {'CPU ms/close app+db':>20} {'cores used by others':>21}")
    for r in runs:
        cpu = r["cpu_ms_per_close"]
        print(f"{r['customers']:>10,} {r['seconds']:>9} {r['periods_per_s']:>10} {r['seconds_per_1000_periods']:>9} "
              f"{r['per_period_time_vs_smallest']:>11} {r['queries_per_close']:>14} "
              f"{cpu['workers']:>11} + {cpu['postgresql']:<6} {r['other_work_cores']:>21}")
    if target:
        verdict = "within" if target["seconds"] <= TARGET_SECONDS else "OVER"
        print(f"{TARGET_SIZE:,} customers closed in {target['seconds']} s → {verdict} the {TARGET_SECONDS} s target")
    for failure in failures:
        print(f"FAILED {failure}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "close", "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_worktree_dirty": bool(git("status", "--porcelain", "--", "billing", "bench")),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load_at_start],
                    "platform": platform.platform(), "python": platform.python_version(),
                    "note": "shared with other work; figures are lower than on a quiet machine"},
        "config": {"sizes": sizes, "worker_processes": args.workers, "pool": "prefork",
                   "broker": f"redis db {REDIS_DB}", "database": f"postgresql {DB_NAME}", "debug": False,
                   "period": [start.isoformat(), end.isoformat()], "plan": {
                       "base_price": str(BASE_FEE), "included_credits": "10000", "rollover": "capped at 2000",
                       "overage_tiers": [["5000", "0.002"], ["25000", "0.0015"], [None, "0.001"]]},
                   "profiles": [{"name": n, "events": [[f, q, d] for f, q, d, _ in u], "invoice_total": str(t)}
                                for n, u, t in PROFILES],
                   "samples_per_profile": args.samples},
        "target": {"customers": TARGET_SIZE, "seconds": TARGET_SECONDS,
                   "met": bool(target and target["seconds"] <= TARGET_SECONDS)},
        "runs": runs, "failures": failures, "ok": not failures,
    }, indent=2, default=str) + "\n")
    written = args.output.resolve()
    log(f"wrote {written.relative_to(ROOT) if written.is_relative_to(ROOT) else written}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
