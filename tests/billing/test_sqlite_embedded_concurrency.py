"""The embedded default (a SQLite file) must queue concurrent writers, not fail them
with "database is locked". Runs in a subprocess against a real file, as `make run` does."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
RACE = textwrap.dedent("""
    import os, sys, threading
    import django
    django.setup()
    from decimal import Decimal
    from django.db import connection
    from django.utils import timezone
    from billing.ledger_audit import ledger_mismatches
    from billing.services.customers import customer_create
    from billing.services.metering import EventInput, record_event
    from plans.models import Feature, Plan

    Feature.objects.create(code="f", name="f")
    Plan.objects.create(code="free", name="Free", included_credits=Decimal("1000"))
    customer_create(external_id="race", name="r", plan_code="free", now=timezone.now())
    errors, barrier = [], threading.Barrier(8)

    def worker(n):
        barrier.wait()
        for i in range(10):
            try:
                record_event(event=EventInput(event_id=f"t{n}-{i}", customer="race", feature="f",
                                              quantity=Decimal("1")), now=timezone.now())
            except Exception as error:
                errors.append(repr(error))
        connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    from billing.models import CreditGrant
    print("errors", len(errors), errors[:1])
    print("remaining", CreditGrant.objects.get().remaining)
    print("mismatches", list(ledger_mismatches()))
""")


# A few seconds: migrates a fresh file database.
def test_eight_concurrent_writers_on_the_sqlite_default_all_succeed(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'embedded.sqlite3'}",
           "DJANGO_SETTINGS_MODULE": "config.settings"}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)

    result = subprocess.run([sys.executable, "-c", RACE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stderr
    assert "errors 0 []" in result.stdout, result.stdout
    assert "remaining 920.000000" in result.stdout
    assert "mismatches []" in result.stdout
