"""The beat-scheduled close, run by real Celery worker processes over real Redis against
the test database: what production does every few minutes, the due periods fanned out
in chunks to both processes."""

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from celery import Celery
from django.conf import settings
from django.db import connection
from django.utils import timezone

from billing.models import BillingPeriod, Invoice
from billing.services.metering import EventInput, record_event
from tests.redis_support import redis_up, redis_url
from tests.factories import FeatureFactory, make_customer, pro_plan

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = redis_url(13)

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]



@pytest.mark.skipif(not redis_up(REDIS_URL), reason="needs Redis on 127.0.0.1:6379")
def test_a_celery_worker_on_redis_runs_the_scheduled_close():
    # Periods that ended well over the grace window ago, in real time (the worker's clock).
    now = timezone.now()
    started = (now - timedelta(days=40)).replace(microsecond=0)
    FeatureFactory(code="api")
    customers = [make_customer(pro_plan(), started_at=started, now=started) for _ in range(3)]
    record_event(event=EventInput(event_id="e1", customer=customers[0].external_id, feature="api",
                                  quantity=Decimal("12000"), timestamp=started + timedelta(days=1)),
                 now=started + timedelta(days=1))
    periods = BillingPeriod.objects.filter(start=started)

    # A queue of its own (the chunks the beat task fans out follow it there), one period
    # per chunk, two worker processes.
    queue = f"overage-test-{uuid.uuid4().hex[:8]}"
    database = connection.settings_dict
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "CELERY_BROKER_URL": REDIS_URL,
           "OVERAGE_CLOSE_CHUNK_PERIODS": "1",
           "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "prefork", "--concurrency", "2",
         "-Q", queue, "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        task_name = settings.CELERY_BEAT_SCHEDULE["close-due-periods"]["task"]
        # Not the current app: shared tasks would follow it to Redis for the rest of the run.
        with Celery("probe", broker=REDIS_URL, set_as_current=False) as probe:
            probe.send_task(task_name, queue=queue)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and periods.filter(status="open").exists():
            time.sleep(0.5)  # waiting on other processes, not simulating time
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0]

    assert not periods.filter(status="open").exists(), output
    assert Invoice.objects.filter(kind="period_close").count() == 3
    invoice = Invoice.objects.get(period__customer=customers[0], kind="period_close")
    assert [(line.kind, line.amount) for line in invoice.lines.order_by("id")] == [
        ("overage", Decimal("4.00")), ("base_fee", Decimal("49.00"))]
