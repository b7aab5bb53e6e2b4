"""Faults under load: real gunicorn and celery processes on PostgreSQL and Redis, 64
clients sending events, while workers are killed, sessions terminated and both services
restarted. Afterwards the books must be exactly right.

Replay a run with the seed it printed: CHAOS_SEED=<seed> pytest tests/chaos -m chaos.
The seed fixes the fault schedule (what, when, how deep into the close) and the clients'
choices; the exact interleaving of requests and faults is the machine's.
"""

import asyncio
import os
import random
import time
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from billing.ledger_audit import ledger_mismatches
from billing.models import BillingPeriod, Invoice, UsageEvent
from billing.periods import add_months, period_start
from billing.reconciliation import disagreements
from billing.services.api_keys import api_key_create
from billing.services.metering import EventInput, record_events
from tests.chaos import harness
from tests.chaos.harness import CLOSE_DUE_TASK, CLOSE_QUEUE, Fault, FaultRunner, Load, Web, Worker, log
from tests.factories import FeatureFactory, make_customer, pro_plan, set_cost, set_tiers

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CUSTOMERS = 20
CLIENTS = 64
LOAD_SECONDS = 60  # at least; longer if setup was slow, so the boundary's close happens under load
GRACE_SECONDS = 10  # late-event window of the processes (and of this one's checks)
SETUP_ALLOWANCE = 15  # seconds of setup before the load starts (estimated; the run adapts)
BOUNDARY_INTO_LOAD = 30  # the current period ends this long after the load starts


def _seed() -> int:
    value = os.environ.get("CHAOS_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 10**6)


def _anchor_for(boundary):
    """A billing anchor about half a year before `boundary` whose monthly periods end
    exactly at `boundary` (days 29-31 clamp in short months: other months back, then)."""
    for months in (6, 5, 7, 4, 8, 3, 9, 2, 10, 11, 12):
        anchor = add_months(boundary, -months)
        if period_start(anchor, "month", months) == boundary:
            return anchor
    raise AssertionError(f"no anchor for {boundary}")


def _catalogue():
    feature = FeatureFactory(code="api")
    # Pro: base fee, 1 000 included credits, flat overage, unused credits expire.
    pro = pro_plan(included_credits=Decimal("1000"))
    # Team: tiered overage, capped rollover, 2 credits a unit, and progressive invoices
    # every $10 of overage (bill_progressively_task runs in the worker during the load).
    team = pro_plan(code="team", name="Team", base_price=Decimal("99"), included_credits=Decimal("2000"),
                    rollover_policy="capped", rollover_max_credits=Decimal("500"),
                    progressive_billing_threshold=Decimal("10"))
    set_tiers(team, ("5000", "0.004"), (None, "0.002"))
    set_cost(team, feature, "2")
    return feature, [pro, team]


def _customers(plans, started_at, now):
    """20 customers half a year into their subscriptions: five past periods or so, already
    due for close, each with some usage (overage in many), and the current period. They share
    the anchor, so each past period's usage of all of them is one batch."""
    rng = random.Random(7)
    customers = [make_customer(plans[index % 2], started_at=started_at, now=now, external_id=f"chaos-{index:02d}")
                 for index in range(CUSTOMERS)]
    starts = BillingPeriod.objects.filter(customer=customers[0], end__lte=now).order_by("start").values_list(
        "start", flat=True)
    for number, start in enumerate(starts):
        at = start + timedelta(hours=2)
        results = record_events(events=[
            EventInput(event_id=f"setup-{customer.external_id}-{number}-{n}", customer=customer.external_id,
                       feature="api", quantity=Decimal(rng.randint(100, 900)), timestamp=at)
            for customer in customers for n in range(2)], now=at + timedelta(minutes=1))
        assert all(r.error is None for r in results)
    return customers


def _due_open_periods() -> int:
    return harness.scalar(
        "SELECT count(*) FROM billing_billingperiod WHERE status = 'open' AND \"end\" <= now() - %s * interval '1 second'",
        (GRACE_SECONDS,))


def _closed_periods() -> int:
    return harness.scalar("SELECT count(*) FROM billing_billingperiod WHERE status = 'closed'")


def _schedule(rng: random.Random, *, web: Web, worker: Worker, load_seconds: float, boundary_close_at: float,
              figures: Counter) -> list[Fault]:
    def close_and_kill_worker() -> str:
        due, closed_before = _due_open_periods(), _closed_periods()
        target = rng.randint(5, 60)
        queued = harness.queued_tasks()
        harness.send_task(CLOSE_DUE_TASK, queue=CLOSE_QUEUE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            closed = _closed_periods() - closed_before
            if closed >= target or _due_open_periods() == 0:
                break
            time.sleep(0.02)  # polling the worker's progress
        closed = _closed_periods() - closed_before
        worker.kill()
        figures["worker_sigkills"] += 1
        mid = 0 < closed < due
        figures["worker_killed_mid_close"] += int(mid)
        pause = rng.uniform(1, 3)
        time.sleep(pause)  # the worker stays dead a moment, as after a crash
        worker.start_and_wait()
        return (f"close_due_periods_task sent ({due} due periods, {queued} tasks queued); worker SIGKILLed with {closed} of them closed"
                f"{'' if mid else ' (not mid-close)'}; restarted after {pause:.1f} s")

    def terminate() -> str:
        ended, in_transaction = harness.terminate_app_backends()
        figures["pg_terminate_backend"] += 1
        figures["sessions_terminated"] += ended
        figures["sessions_terminated_in_transaction"] += in_transaction
        return f"pg_terminate_backend on {ended} app sessions ({in_transaction} in a transaction)"

    def kill_web_worker() -> str:
        workers = web.workers()
        victim = rng.choice(workers)
        os.kill(victim, 9)
        figures["gunicorn_worker_sigkills"] += 1
        return f"gunicorn worker {victim} SIGKILLed (of {len(workers)}); the master starts another"

    def restart_web() -> str:
        began = time.monotonic()
        web.stop(timeout=15)
        web.start_and_wait()
        figures["gunicorn_restarts"] += 1
        return f"gunicorn master stopped (SIGTERM) and started again: {time.monotonic() - began:.1f} s without it"

    def restart_pg() -> str:
        began = time.monotonic()
        harness.restart_postgres("fast")
        figures["postgres_restarts"] += 1
        return f"PostgreSQL restarted (fast: every session ended): {time.monotonic() - began:.1f} s"

    def restart_redis() -> str:
        began = time.monotonic()
        harness.restart_redis()
        figures["redis_restarts"] += 1
        return f"Redis shut down without saving (queues and cache lost) and started: {time.monotonic() - began:.1f} s"

    def boundary_close() -> str:
        harness.send_task(CLOSE_DUE_TASK, queue=CLOSE_QUEUE)
        figures["close_runs_during_load"] += 1
        return f"close_due_periods_task sent: the current periods ended {GRACE_SECONDS} s ago"

    closes = [Fault(rng.uniform(1, 4), "close + SIGKILL celery worker", close_and_kill_worker),
              Fault(boundary_close_at, "close at the boundary", boundary_close)]
    others = [("pg_terminate_backend", terminate)] * 3 + [
        ("SIGKILL a gunicorn worker", kill_web_worker), ("restart gunicorn", restart_web),
        ("restart PostgreSQL", restart_pg), ("restart Redis", restart_redis)]
    while True:  # times at least 4 s apart, so each fault's effect is its own
        times = sorted(rng.uniform(12, load_seconds - 10) for _ in others)
        if all(b - a >= 4 for a, b in zip(times, times[1:])):
            break
    rng.shuffle(others)
    return closes, [Fault(at, name, action) for at, (name, action) in zip(times, others)]


def test_events_and_invoices_survive_faults_under_load(tmp_path, settings):
    """What is asserted, after the faults are over, every process has been restarted,
    the task backlog has drained and a last close run has finished:

    - every event id that got a 2xx at least once (alone or inside a batch) is stored
      exactly once, with the customer and quantity sent;
    - an event id whose every attempt got a 4xx is not stored;
    - an event id whose attempts got only 5xx or no answer (reset, refused, timeout) may
      or may not be stored — the request may have committed before the connection died —
      but, stored, it is stored once (and, like every stored event, charged once);
    - nothing is stored that no client sent;
    - the ledger audit (`ledger_check`) finds every grant, period, event and rollup equal
      to its entries: each stored event is charged its credits once and counted once in
      the rollups;
    - no period is left due, every closed period has exactly one period-close invoice and
      every open period none;
    - `reconcile`'s `disagreements()` is empty: every invoice's overage equals the price
      of the ledger's overage to the cent, balances equal the ledger, bands adjacent.
    """
    unable = harness.services_restartable()
    if unable:
        pytest.skip(unable)
    seed = _seed()
    log(f"CHAOS_SEED={seed}")
    rng = random.Random(seed)
    settings.OVERAGE_PERIOD_GRACE_SECONDS = GRACE_SECONDS
    started = time.monotonic()

    now = timezone.now()
    boundary = (now + timedelta(seconds=SETUP_ALLOWANCE + BOUNDARY_INTO_LOAD)).replace(microsecond=0)
    _, plans = _catalogue()
    customers = _customers(plans, _anchor_for(boundary), now)
    log(f"customers and their past usage: {time.monotonic() - started:.1f} s")
    external_ids = [c.external_id for c in customers]
    _, api_key = api_key_create(name="chaos")
    harness.flush_redis_dbs()

    web = Web(tmp_path, api_key, OVERAGE_PERIOD_GRACE_SECONDS=str(GRACE_SECONDS))
    worker = Worker(tmp_path, OVERAGE_CLOSE_CHUNK_PERIODS="1", CELERY_VISIBILITY_TIMEOUT_SECONDS="10",
                    OVERAGE_PERIOD_GRACE_SECONDS=str(GRACE_SECONDS))
    figures: Counter = Counter()
    runners = []
    try:
        web.start_and_wait()
        worker.start_and_wait()
        load_start_wall = timezone.now()
        boundary_close_at = (boundary - load_start_wall).total_seconds() + GRACE_SECONDS + 2
        load_seconds = max(LOAD_SECONDS, boundary_close_at + 15)
        log(f"setup {time.monotonic() - started:.0f} s; the current periods end {boundary:%H:%M:%S} "
            f"(load + {boundary_close_at - GRACE_SECONDS - 2:.0f} s); load for {load_seconds:.0f} s")
        closes, faults = _schedule(rng, web=web, worker=worker, load_seconds=load_seconds,
                                   boundary_close_at=boundary_close_at, figures=figures)
        runners = [FaultRunner(closes, "closes"), FaultRunner(faults, "faults")]
        for fault in sorted(closes + faults, key=lambda f: f.at):
            log(f"scheduled t={fault.at:5.1f}s {fault.name}")
        late = (boundary - timedelta(seconds=1)).isoformat()
        load = Load(base=web.base, api_key=api_key, customers=external_ids, feature="api",
                    rng=random.Random(rng.random()), run=f"r{seed}", clients=CLIENTS,
                    stale_timestamp=(now - timedelta(days=200)).isoformat(), late_timestamp=lambda: late)
        for runner in runners:
            runner.start()
        outcomes = asyncio.run(load.run_for(load_seconds))
        for runner in runners:
            runner.join(timeout=120)
            assert not runner.is_alive(), f"{runner.name} did not finish"
        load_done = time.monotonic()
        figures["boundary_periods_closed_during_load"] = harness.scalar(
            "SELECT count(*) FROM billing_billingperiod WHERE status = 'closed' AND \"end\" = %s", (boundary,))

        # Faults over: everything up again, the backlog drained, a last close run.
        harness.ensure_services_up()
        for process in (web, worker):
            if not process.alive():
                log(f"{process.name} was down after the faults; starting it")
                process.start_and_wait()
        harness.send_task(CLOSE_DUE_TASK, queue=CLOSE_QUEUE)
        harness.wait_for(lambda: _due_open_periods() == 0 and harness.broker_idle(),
                         "due periods closed and the task backlog drained", 120, interval=0.5)
        drained = time.monotonic() - load_done
    finally:
        for runner in runners:
            if runner.is_alive():
                runner.join(timeout=120)
        web.stop()
        worker.stop()
        harness.ensure_services_up()
        harness.terminate_app_backends()
        connection.close()  # ended by the PostgreSQL restart; the next query reconnects

    figures_line = {
        "seed": seed, "requests": sum(outcomes.requests.values()), "single": outcomes.single_requests,
        "batch": outcomes.batch_requests, "resends": outcomes.resends, "events_sent": len(outcomes.sent),
        "http_statuses": dict(sorted(outcomes.requests.items())),
        "events_2xx": len(outcomes.ok_ids()), "events_only_4xx": len(outcomes.refused_ids()),
        "events_uncertain": len(outcomes.uncertain_ids()), **figures,
        "invoices": dict(Invoice.objects.order_by().values_list("kind").annotate(n=Count("pk"))),
        "drain_s": round(drained, 1), "total_s": round(time.monotonic() - started, 1),
    }
    log(f"figures: {figures_line}")
    for line in outcomes.error_samples:
        log(f"sample error: {line}")
    assert [e for runner in runners for e in runner.errors] == []

    stored = Counter()
    stored_rows = {}
    for event_id, customer, quantity in UsageEvent.objects.exclude(event_id__startswith="setup-").values_list(
            "event_id", "customer__external_id", "quantity").iterator(chunk_size=10_000):
        stored[event_id] += 1
        stored_rows[event_id] = (customer, quantity)
    ok, refused, uncertain = outcomes.ok_ids(), outcomes.refused_ids(), outcomes.uncertain_ids()
    context = f"CHAOS_SEED={seed}"

    assert [i for i in ok if stored[i] != 1] == [], f"{context}: events answered 2xx not stored exactly once"
    assert [i for i in ok if stored_rows[i] != (outcomes.sent[i]["customer"], Decimal(outcomes.sent[i]["quantity"]))
            ] == [], f"{context}: stored events differ from what was sent"
    assert [i for i in refused if stored[i]] == [], f"{context}: events refused (4xx) every time were stored"
    assert [i for i in uncertain if stored[i] > 1] == [], f"{context}: events stored twice"
    assert set(stored) <= set(outcomes.sent), f"{context}: events stored that nobody sent"
    assert {outcomes.kind[i] for i in ok} <= {"now", "late"}, f"{context}: an event that must be refused was accepted"

    assert list(ledger_mismatches()) == [], context
    call_command("ledger_check", "--all")
    assert not BillingPeriod.objects.filter(status="open", end__lte=timezone.now() - timedelta(
        seconds=GRACE_SECONDS)).exists(), f"{context}: due periods left open"
    per_period = dict(Invoice.objects.filter(kind=Invoice.Kind.PERIOD_CLOSE).values_list("period")
                      .annotate(n=Count("pk")).values_list("period", "n"))
    closed = set(BillingPeriod.objects.filter(status="closed").values_list("pk", flat=True))
    assert {pk: per_period.get(pk, 0) for pk in closed if per_period.get(pk, 0) != 1} == {}, context
    assert set(per_period) <= closed, f"{context}: an open period has a close invoice"
    # The boundary's periods were closed (during the load or by the last run) with the
    # load's usage on their invoices.
    assert BillingPeriod.objects.filter(end=boundary, status="closed").count() == CUSTOMERS, context
    assert disagreements(now=timezone.now()) == [], context
