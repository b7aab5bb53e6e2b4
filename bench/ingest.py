"""Ingestion benchmark for Overage: the API against the raw limits of the same machine.

Run from the project root:  .venv/bin/python bench/ingest.py   (or `make bench`)

What it does, all on 127.0.0.1, bounded in time and count (about 1-2 minutes):
  1. drops and re-creates the PostgreSQL database `overage_bench`, migrates it, and
     creates one feature, a Pro-like plan (10 000 included credits, overage at 0.002),
     N customers and an API key through the project's own services;
  2. starts `gunicorn config.wsgi --workers 4` (sync workers, as the README) and the check server
     `gunicorn config.asgi:application --worker-class asgi --workers 2` in production mode
     (DEBUG=0); checks and single events go to the check server, as production routes
     them (--check-server wsgi, --single-server wsgi: to the first);
  3. measures, with the lean asyncio client of bench/loadgen.py:
       batch ingestion   POST /api/v1/events/batch (1 000 events per request, 2 clients;
                         then one 1 000-event request alone as a probe)
       single ingestion  POST /api/v1/events: 32 clients, then an open loop at 1 000/s
       entitlement check POST /api/v1/entitlements/check: 8 clients, then an open loop
                         at 1 000/s
  4. measures the raw limits: PostgreSQL COPY of as many rows as the batch phase
     ingested, into a scratch table `bench_raw_events`; one-row INSERT+COMMIT
     transactions; Redis GET round trips;
  5. prints a table and writes bench/results/ingest.json.
gunicorn is always stopped at the end. The only database touched is `overage_bench`
(left in place for inspection; pass --drop-db to drop it at the end).

Exit status is 1 if any API answer was not the one expected (wrong status, batch
counts.created != batch size, a check that was not allowed) or a phase failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import loadgen
from bench_support import (CLK_TCK, PG_ADMIN_URL, ROOT, children, drop_database, git, log, machine_busy_ticks,
                           machine_steal_ticks,
                           process_cpu_ticks, recreate_database)

RESULTS = ROOT / "bench" / "results" / "ingest.json"
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent

DB_NAME = "overage_bench"
DB_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

FEATURE = "api_call"
PLAN = "pro"
INCLUDED_CREDITS = Decimal("10000")
OVERAGE_UNIT_PRICE = Decimal("0.002")
PROPERTIES = {"region": "eu-west", "model": "small"}  # what every event carries


# --- Setup (runs in a child process with Django configured) ---------------------------

def setup_catalogue(customers: int) -> None:
    """Child-process entry point: create the catalogue, customers and an API key through
    the project's services, and print the key as the last line."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.utils import timezone as dj_timezone

    from billing.services.api_keys import api_key_create
    from billing.services.customers import customer_create
    from plans.services import feature_create, plan_create

    feature_create(code=FEATURE, name="API call", unit="call")
    plan_create(code=PLAN, name="Pro", included_credits=INCLUDED_CREDITS, overage_enabled=True,
                overage_unit_price=OVERAGE_UNIT_PRICE, feature_costs={FEATURE: Decimal("1")})
    now = dj_timezone.now()
    for index in range(customers):
        customer_create(external_id=customer_id(index), name=f"Bench customer {index}",
                        email=f"bench{index}@example.com", plan_code=PLAN, now=now)
    _, key = api_key_create(name="bench")
    print(key)


def customer_id(index: int) -> str:
    return f"bench-cust-{index:04d}"


# --- Helpers ---------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BENCH_REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/12"  # cache and broker of this run (flushed at start)


def app_env(secret_key: str) -> dict[str, str]:
    """Production mode: PostgreSQL, Redis as cache (cached credit positions) and Celery
    broker, a celery worker beside gunicorn; no Stripe."""
    env = dict(os.environ)
    for name in ("STRIPE_SECRET_KEY", "STRIPE_API_BASE"):
        env.pop(name, None)
    env.update({
        "REDIS_URL": BENCH_REDIS_URL,
        "CELERY_BROKER_URL": BENCH_REDIS_URL,
        "OVERAGE_GROUP_COMMIT": "1",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": DB_URL,
        # Connections live through the run: a backend that exits takes its CPU figures with it.
        "DB_CONN_MAX_AGE": "600",
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",  # plain http on loopback
        "OVERAGE_RATE_INGEST": "off",  # measure the service, not the rate limit
        "SECRET_KEY": secret_key,
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_checked(cmd: list[str], env: dict[str, str], what: str, timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"{what} failed with exit status {proc.returncode}")
    return proc.stdout


# --- Database --------------------------------------------------------------------------

def count_rows(sql: str) -> int:
    import psycopg

    with psycopg.connect(DB_URL) as conn:
        return conn.execute(sql).fetchone()[0]


# --- Server-side CPU (where did the time go?) ---------------------------------------------

def rss_mb(pids: list[int]) -> dict[int, float]:
    """Resident set size of each process, in MB (VmRSS from /proc)."""
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            continue
    return out


def cpu_snapshot(server: "Server") -> dict[str, dict[int, int]]:
    """CPU ticks of the gunicorn workers and of the PostgreSQL backends serving
    overage_bench (read from /proc; empty when PostgreSQL runs elsewhere)."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        pg_pids = [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()", (DB_NAME,))]
    snap: dict[str, dict[int, int]] = {"app": {}, "db": {}, "machine": {0: machine_busy_ticks()},
                                       "steal": {0: machine_steal_ticks()}}
    for kind, pids in (("app", children(server.proc.pid)), ("db", pg_pids)):
        for pid in pids:
            ticks = process_cpu_ticks(pid)
            if ticks is not None:
                snap[kind][pid] = ticks
    return snap


def cpu_used(before: dict, after: dict, seconds: float) -> dict[str, float | None]:
    """Cores busy on average during the phase: app (gunicorn workers), db (backends),
    machine (every process, this client and other people's work included), steal (the
    host running other virtual machines while this one was ready: part of machine)."""
    out = {}
    for kind in ("app", "db", "machine", "steal"):
        if not after[kind]:
            out[f"{kind}_cpu_cores"] = None
            continue
        ticks = sum(t - before[kind].get(pid, 0) for pid, t in after[kind].items())
        out[f"{kind}_cpu_cores"] = round(ticks / CLK_TCK / seconds, 2) if seconds else None
    return out


# --- gunicorn ---------------------------------------------------------------------------

class Server:
    """gunicorn: the application (config.wsgi, threaded workers) or the check server
    (config.asgi, asyncio workers: `threads` is then unused)."""

    def __init__(self, env: dict[str, str], workers: int, threads: int, *, check_server: bool = False,
                 worker_class: str = "sync"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="overage-bench-gunicorn-", suffix=".log", delete=False)
        kind = ["config.asgi:application", "--worker-class", "asgi"] if check_server else [
            "config.wsgi", "--worker-class", worker_class, *(["--threads", str(threads)] if worker_class == "gthread"
                                                             else [])]
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), *kind, "--workers", str(workers), "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, api_key: str, timeout: float = 30.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                response = requests.get(f"{self.base}/api/v1/features", timeout=2,
                                        headers={"Authorization": f"Bearer {api_key}"})
                if response.status_code == 200:
                    return
                raise RuntimeError(f"GET /api/v1/features answered {response.status_code}: {response.text[:500]}")
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still booting
                time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers), SIGKILL our own session if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session started for this process
                self.proc.wait(timeout=5)
        self.log.close()


# --- Load generator ----------------------------------------------------------------------

class Phase:
    """Results of one bounded closed-loop phase."""

    def __init__(self, name: str):
        self.name = name
        self.latencies: list[float] = []  # seconds, successful requests
        self.failed_latencies: list[float] = []  # seconds, answered but not as expected
        self.statuses: dict[int, int] = {}
        self.ok = 0
        self.failures = 0
        self.failure_samples: list[str] = []
        self.items = 0  # events (or checks) accepted
        self.rejected = 0  # events recorded with status "rejected"
        self.elapsed = 0.0
        self.client_cpu = 0.0
        self.connections: int | None = None  # open loop: connections the client opened
        self.server_cpu: dict[str, float | None] = {}

    def fail(self, message: str) -> None:
        self.failures += 1
        if len(self.failure_samples) < 5:
            self.failure_samples.append(message[:500])

    def answer(self, status: int, raw: bytes, latency: float, check) -> None:
        """Count one answered request; `check(status, body) -> (items, rejected, error_or_None)`."""
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        self.statuses[status] = self.statuses.get(status, 0) + 1
        items, rejected, error = check(status, payload)
        if error is not None:
            self.failed_latencies.append(latency)
            self.fail(f"HTTP {status}: {error} {raw[:300]!r}")
            return
        self.ok += 1
        self.items += items
        self.rejected += rejected
        self.latencies.append(latency)

    def summary(self) -> dict:
        return {
            "requests_ok": self.ok, "requests_failed": self.failures, "http_statuses": self.statuses,
            "items": self.items,
            "rejected_events": self.rejected, "elapsed_s": round(self.elapsed, 3),
            "requests_per_s": round(self.ok / self.elapsed, 1) if self.elapsed else None,
            "items_per_s": round(self.items / self.elapsed, 1) if self.elapsed else None,
            "latency_p50_ms": _ms(percentile(self.latencies, 50)),
            "latency_p99_ms": _ms(percentile(self.latencies, 99)),
            "latency_max_ms": _ms(max(self.latencies) if self.latencies else None),
            "client_cpu_cores": round(self.client_cpu / self.elapsed, 2) if self.elapsed else None,
            "client_cpu_us_per_request": round(self.client_cpu / (self.ok + self.failures) * 1e6)
            if self.ok + self.failures else None,
            "client_connections": self.connections,
            **self.server_cpu,
            "failure_samples": self.failure_samples,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def closed_loop(name: str, *, base: str, api_key: str, path: str, concurrency: int, seconds: float,
                      max_requests: int, timeout: float, make_body, check) -> Phase:
    """`concurrency` clients each send one request, wait for the answer, repeat, until
    `seconds` have passed or `max_requests` have been sent (whichever comes first).
    `check(status, body) -> (items, rejected, error_or_None)`."""
    phase = Phase(name)
    client = loadgen.Client(base, api_key)
    cpu_start = time.process_time()
    try:
        phase.elapsed = await loadgen.closed_loop(
            client, path=path, concurrency=concurrency, seconds=seconds, max_requests=max_requests, timeout=timeout,
            make_body=lambda worker, seq: json.dumps(make_body(worker, seq)).encode(),
            on_answer=lambda status, raw, latency: phase.answer(status, raw, latency, check), on_error=phase.fail)
    finally:
        client.close()
    phase.client_cpu = time.process_time() - cpu_start
    return phase


async def open_loop(name: str, *, base: str, api_key: str, path: str, rate: float, seconds: float, timeout: float,
                    make_body, check) -> Phase:
    """Requests sent at a fixed `rate` for `seconds`, whether or not earlier ones have
    been answered (how production traffic arrives). Latency runs from each request's
    scheduled send time, so time spent queueing behind a slow server is counted too."""
    phase = Phase(name)
    client = loadgen.Client(base, api_key)
    cpu_start = time.process_time()
    phase.elapsed = await loadgen.open_loop(
        client, path=path, rate=rate, seconds=seconds, timeout=timeout,
        make_body=lambda worker, seq: json.dumps(make_body(worker, seq)).encode(),
        on_answer=lambda status, raw, latency: phase.answer(status, raw, latency, check), on_error=phase.fail)
    phase.client_cpu = time.process_time() - cpu_start
    phase.connections = client.opened
    return phase


def event(run: str, kind: str, worker: int, seq: int, index: int, customers: int, shards: int = 1) -> dict:
    """One event; with `shards` > 1, client `worker` sends only for its own share of the
    customers (every `shards`-th), so concurrent batches never wait on each other's locks."""
    spread = seq * 7919 + index + worker
    return {
        "id": f"{run}-{kind}-{worker}-{seq}-{index}",
        "customer": customer_id(spread % customers if shards == 1
                                else worker % shards + shards * (spread % (customers // shards))),
        "feature": FEATURE,
        "quantity": "1",
        "properties": PROPERTIES,
    }


def check_batch(size: int):
    def check(status: int, payload):
        if status != 200 or not isinstance(payload, dict):
            return 0, 0, "expected 200"
        counts = payload.get("counts") or {}
        if counts.get("created") != size:
            return 0, 0, f"counts={counts}, expected created={size}"
        rejected = sum(1 for r in payload["results"] if (r.get("event") or {}).get("status") == "rejected")
        return size, rejected, None
    return check


def check_single(status: int, payload):
    if status != 201 or not isinstance(payload, dict):
        return 0, 0, "expected 201"
    return 1, int(payload.get("status") == "rejected"), None


def check_entitlement(status: int, payload):
    if status != 200 or not isinstance(payload, dict):
        return 0, 0, "expected 200"
    if payload.get("allowed") is not True:
        return 0, 0, f"not allowed: reason={payload.get('reason')}"
    return 1, 0, None


# --- Raw limits ---------------------------------------------------------------------------

def copy_limit(rows: int, customers: int, run: str) -> dict:
    """COPY `rows` event-shaped rows into a regular (logged) table carrying the same
    per-customer unique index on the event id that usage events have. Times the COPY
    and its commit; the rows are generated beforehand."""
    import psycopg
    from psycopg.types.json import Jsonb

    now = datetime.now(timezone.utc)
    data = [(1 + (i % customers), f"{run}-raw-{i}", 1, Decimal("1"), now, Jsonb(PROPERTIES)) for i in range(rows)]
    with psycopg.connect(DB_URL) as conn:
        conn.execute("""
            CREATE TABLE bench_raw_events (
                customer_id bigint NOT NULL, event_id text NOT NULL, feature_id bigint NOT NULL,
                quantity numeric NOT NULL, ts timestamptz NOT NULL, properties jsonb NOT NULL
            )""")
        conn.execute("CREATE UNIQUE INDEX bench_raw_events_uniq ON bench_raw_events (customer_id, event_id)")
        conn.commit()
        with conn.cursor() as cur:
            start = time.perf_counter()
            with cur.copy("COPY bench_raw_events (customer_id, event_id, feature_id, quantity, ts, properties) "
                          "FROM STDIN") as copy:
                for row in data:
                    copy.write_row(row)
            conn.commit()
            elapsed = time.perf_counter() - start
        copied = conn.execute("SELECT count(*) FROM bench_raw_events").fetchone()[0]
    if copied != rows:
        raise RuntimeError(f"COPY stored {copied} rows, expected {rows}")
    return {"rows": rows, "elapsed_s": round(elapsed, 4), "rows_per_s": round(rows / elapsed, 1)}


def commit_limit(seconds: float, max_tx: int, customers: int, run: str) -> dict:
    """One row per transaction (INSERT + COMMIT) on one connection: the rate a path that
    commits every event on its own could reach if the application cost nothing."""
    import psycopg
    from psycopg.types.json import Jsonb

    now = datetime.now(timezone.utc)
    done = 0
    with psycopg.connect(DB_URL) as conn:
        start = time.perf_counter()
        deadline = start + seconds
        while done < max_tx and time.perf_counter() < deadline:
            conn.execute("INSERT INTO bench_raw_events VALUES (%s, %s, %s, %s, %s, %s)",
                         (1 + done % customers, f"{run}-tx-{done}", 1, Decimal("1"), now, Jsonb(PROPERTIES)))
            conn.commit()
            done += 1
        elapsed = time.perf_counter() - start
    return {"transactions": done, "elapsed_s": round(elapsed, 3), "tx_per_s": round(done / elapsed, 1)}


def redis_limit(calls: int) -> dict:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5)
    key = f"overage-bench:{uuid.uuid4().hex}"
    client.set(key, "12345.678900", ex=60)
    try:
        for _ in range(100):  # warm the connection
            client.get(key)
        latencies = []
        start = time.perf_counter()
        for _ in range(calls):
            sent = time.perf_counter()
            client.get(key)
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - start
    finally:
        client.delete(key)
        client.close()
    return {"calls": calls, "ops_per_s": round(calls / elapsed, 1),
            "latency_p50_ms": _ms(percentile(latencies, 50)), "latency_p99_ms": _ms(percentile(latencies, 99))}


# --- Report -------------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,}"


def print_table(rows: list[tuple[str, object, str, str]]) -> None:
    widths = [max(len(str(r[0])) for r in rows), max(len(fmt(r[1])) for r in rows),
              max(len(r[2]) for r in rows), max(len(r[3]) for r in rows)]
    header = ("metric", "value", "unit", "ratio to raw limit")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    line = "  ".join(["{:<%d}" % widths[0], "{:>%d}" % widths[1], "{:<%d}" % widths[2], "{:<%d}" % widths[3]])
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for metric, value, unit, ratio in rows:
        print(line.format(metric, fmt(value), unit, ratio))


def ratio(numerator, denominator, limit: str) -> str:
    if not numerator or not denominator:
        return ""
    share = numerator / denominator
    return f"{share:.2%} of {limit} (1/{denominator / numerator:,.0f})"


def ratio_text(latency, raw, what: str) -> str:
    """A latency as a multiple of the raw round trip it is compared with."""
    if not latency or not raw:
        return ""
    return f"{latency / raw:,.0f}x the {what}"


# --- Main ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (README: 2 per core)")
    parser.add_argument("--worker-class", choices=["sync", "gthread"], default="sync",
                        help="gunicorn worker class of the API server (README: sync; gthread: threaded)")
    parser.add_argument("--threads", type=int, default=16, help="threads per gunicorn worker (gthread)")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="events per batch request (the API's maximum, 1 000, by default)")
    parser.add_argument("--batch-clients", type=int, default=2)
    parser.add_argument("--disjoint-batches", action="store_true",
                        help="each batch client sends for its own share of the customers (sharded streams), "
                             "instead of all of them (default: every batch touches every customer)")
    parser.add_argument("--batch-seconds", type=float, default=15)
    parser.add_argument("--batch-max-requests", type=int, default=200)
    parser.add_argument("--full-batch-probe", type=int, default=1000, metavar="EVENTS",
                        help="after the batch phase, send ONE batch of this many events and report its "
                             "status and latency (informational; 0 to skip)")
    parser.add_argument("--single-clients", type=int, default=32)
    parser.add_argument("--single-seconds", type=float, default=10)
    parser.add_argument("--single-server", choices=("asgi", "wsgi"), default="asgi",
                        help="single events to the check server (asgi, as production routes them) or to gunicorn's "
                             "threaded workers (wsgi); asgi needs --check-server asgi")
    parser.add_argument("--single-rate", type=float, default=1000,
                        help="open-loop single-event phase: requests/s (0: skip)")
    parser.add_argument("--single-rate-seconds", type=float, default=10)
    parser.add_argument("--soak-seconds", type=float, default=0,
                        help="sustained batch load this long, sampling the workers' RSS (make bench: 300)")
    parser.add_argument("--check-server", choices=("asgi", "wsgi"), default="asgi",
                        help="checks to the check server (config/asgi.py, gunicorn's asyncio workers; default) "
                             "or to the application's threaded gunicorn")
    parser.add_argument("--check-workers", type=int, default=2, help="check server workers")
    parser.add_argument("--check-clients", type=int, default=8)
    parser.add_argument("--check-rate", type=float, default=1000, help="open-loop check phase: requests/s (0: skip)")
    parser.add_argument("--check-rate-seconds", type=float, default=10)
    parser.add_argument("--check-seconds", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per single/check phase")
    parser.add_argument("--redis-calls", type=int, default=5000)
    parser.add_argument("--commit-seconds", type=float, default=2, help="duration of the 1-row-tx limit")
    parser.add_argument("--drop-db", action="store_true", help="drop overage_bench at the end")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--setup", type=int, metavar="N", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()

    if args.setup is not None:
        setup_catalogue(args.setup)
        return 0

    started_at = datetime.now(timezone.utc)
    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    run = uuid.uuid4().hex[:8]
    env = app_env(secrets.token_urlsafe(40))
    failures: list[str] = []
    notes: list[str] = []

    log(f"recreating database {DB_NAME}, flushing Redis db 12")
    recreate_database(DB_NAME)
    import redis

    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    log("migrating")
    run_checked([PYTHON, "manage.py", "migrate", "--noinput"], env, "migrate", timeout=180)
    log(f"creating feature, plan, {args.customers} customers and an API key")
    api_key = run_checked([PYTHON, str(Path(__file__).resolve()), "--setup", str(args.customers)], env,
                          "setup", timeout=120).strip().splitlines()[-1]
    setup_s = time.perf_counter() - t0

    log("starting a celery worker (follow-up tasks: alerts, top-ups)")
    worker = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "config", "worker", "--pool", "prefork", "--concurrency", "1",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log(f"starting gunicorn with {args.workers} workers")
    server = Server(env, args.workers, args.threads, worker_class=args.worker_class)
    # Checks go to the check server (config/asgi.py) unless --check-server wsgi: then to the same gunicorn.
    checks = Server(env, args.check_workers, 0, check_server=True) if args.check_server == "asgi" else server
    if args.check_server != "asgi":
        args.single_server = "wsgi"
    phases: dict[str, Phase] = {}
    probe: dict = {}
    soak: dict = {"samples": []}
    gunicorn_log = checks_log = ""
    try:
        server.wait_ready(api_key)
        log(f"gunicorn answers on {server.base}")
        if checks is not server:
            checks.wait_ready(api_key)
            log(f"the check server answers on {checks.base}")

        async def phase(name: str, *, to: Server = server, loop=None, **kwargs) -> Phase:
            """A closed-loop phase (or `loop=open_loop`), with the server's CPU over it."""
            before = cpu_snapshot(to)
            result = await (loop or closed_loop)(name, base=to.base, api_key=api_key, **kwargs)
            result.server_cpu = cpu_used(before, cpu_snapshot(to), result.elapsed)
            return result

        shards = args.batch_clients if args.disjoint_batches else 1

        async def measure() -> None:
            # Warm-up (not measured): every worker opens its database connection and
            # imports its code paths.
            await phase("warmup", path="/api/v1/events", concurrency=4, seconds=5, max_requests=40, timeout=30,
                        make_body=lambda w, s: event(run, "warm", w, s, 0, args.customers), check=check_single)
            await phase("warmup", to=checks, path="/api/v1/entitlements/check", concurrency=4, seconds=5,
                        max_requests=40,
                        timeout=30, make_body=lambda w, s: {"customer": customer_id(s % args.customers),
                                                            "feature": FEATURE, "quantity": "1"},
                        check=check_entitlement)

            log(f"batch ingestion: {args.batch_clients} clients x {args.batch_size} events/request, "
                f"{args.batch_seconds:.0f} s")
            phases["batch"] = await phase(
                "batch", path="/api/v1/events/batch", concurrency=args.batch_clients, seconds=args.batch_seconds,
                max_requests=args.batch_max_requests, timeout=120,
                make_body=lambda w, s: {"events": [event(run, "b", w, s, i, args.customers, shards)
                                                   for i in range(args.batch_size)]},
                check=check_batch(args.batch_size))
            # Single events go where production routes them: the check server (its event
            # loop and group-commit recorder), unless --single-server wsgi.
            singles = checks if args.single_server == "asgi" else server
            log(f"single-event ingestion: {args.single_clients} clients, {args.single_seconds:.0f} s")
            phases["single"] = await phase(
                "single", to=singles, path="/api/v1/events", concurrency=args.single_clients,
                seconds=args.single_seconds, max_requests=args.max_requests, timeout=30,
                make_body=lambda w, s: event(run, "s", w, s, 0, args.customers), check=check_single)
            if args.single_rate:
                log(f"single-event ingestion, open loop: {args.single_rate:.0f} requests/s for "
                    f"{args.single_rate_seconds:.0f} s")
                phases["single_rate"] = await phase(
                    "single_rate", to=singles, loop=open_loop, path="/api/v1/events", rate=args.single_rate,
                    seconds=args.single_rate_seconds, timeout=30,
                    make_body=lambda w, s: event(run, "r", w, s, 0, args.customers), check=check_single)
            log(f"entitlement check: {args.check_clients} clients, {args.check_seconds:.0f} s")
            phases["check"] = await phase(
                "check", to=checks, path="/api/v1/entitlements/check", concurrency=args.check_clients,
                seconds=args.check_seconds, max_requests=args.max_requests, timeout=30,
                make_body=lambda w, s: {"customer": customer_id((s * 31 + w) % args.customers),
                                        "feature": FEATURE, "quantity": "1"},
                check=check_entitlement)
            if args.check_rate:
                log(f"entitlement check, open loop: {args.check_rate:.0f} requests/s for {args.check_rate_seconds:.0f} s")
                phases["check_rate"] = await phase(
                    "check_rate", to=checks, loop=open_loop, path="/api/v1/entitlements/check",
                    rate=args.check_rate, seconds=args.check_rate_seconds, timeout=30,
                    make_body=lambda w, s: {"customer": customer_id((s * 31) % args.customers),
                                            "feature": FEATURE, "quantity": "1"},
                    check=check_entitlement)
            if args.soak_seconds:
                log(f"memory soak: batch ingestion for {args.soak_seconds:.0f} s, RSS sampled every 10 s")

                async def sample_rss() -> None:
                    while True:
                        soak["samples"].append((round(time.monotonic() - soak_t0, 1),
                                                rss_mb(children(server.proc.pid))))
                        await asyncio.sleep(10)

                soak_t0 = time.monotonic()
                sampler = asyncio.create_task(sample_rss())
                phases["soak"] = await phase(
                    "soak", path="/api/v1/events/batch", concurrency=args.batch_clients, seconds=args.soak_seconds,
                    max_requests=10**6, timeout=120,
                    make_body=lambda w, s: {"events": [event(run, "k", w, s, i, args.customers, shards)
                                                       for i in range(args.batch_size)]},
                    check=check_batch(args.batch_size))
                sampler.cancel()
                soak["samples"].append((round(time.monotonic() - soak_t0, 1), rss_mb(children(server.proc.pid))))
            # Last, because a request killed by gunicorn's worker timeout restarts a worker.
            if args.full_batch_probe:
                size = args.full_batch_probe
                log(f"full-size batch probe: one request of {size} events")
                full = await phase(
                    "full", path="/api/v1/events/batch", concurrency=1, seconds=1, max_requests=1, timeout=90,
                    make_body=lambda w, s: {"events": [event(run, "full", w, s, i, args.customers)
                                                       for i in range(size)]},
                    check=check_batch(size))
                answered = full.latencies + full.failed_latencies
                probe.update({"events": size, "ok": full.ok == 1, "http_statuses": full.statuses,
                              "latency_s": round(answered[0], 2) if answered else None,
                              "error": (full.failure_samples or [None])[0], **full.server_cpu})
                phases["_full"] = full

        asyncio.run(measure())
    finally:
        log("stopping gunicorn and the celery worker")
        server.stop()
        if checks is not server:
            checks.stop()
            checks_log = checks.tail(20000)
            Path(checks.log.name).unlink(missing_ok=True)
            if checks.proc.returncode not in (0, -signal.SIGTERM):
                failures.append(f"the check server exited with status {checks.proc.returncode}")
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if server.proc.returncode not in (0, -signal.SIGTERM):
            failures.append(f"gunicorn exited with status {server.proc.returncode}")
        gunicorn_log = server.tail(20000)
        Path(server.log.name).unlink(missing_ok=True)

    worker_timeouts = gunicorn_log.count("WORKER TIMEOUT")
    batch, single, check = phases["batch"], phases["single"], phases["check"]
    checked = [("batch", batch), ("single", single), ("check", check)]
    checked += [(name, phases[name]) for name in ("single_rate", "check_rate") if name in phases]
    for name, result in checked:
        if result.failures:
            failures.append(f"{name}: {result.failures} failed requests, e.g. {result.failure_samples[:2]}")
        if result.ok == 0:
            failures.append(f"{name}: no successful request")
    if probe and not probe["ok"]:
        notes.append(f"the {probe['events']}-event batch did not succeed: {probe['error']}")
    if worker_timeouts:
        notes.append(f"gunicorn logged {worker_timeouts} WORKER TIMEOUT(s) (default --timeout 30 s)")

    copy_rows = max(batch.items, 1000)
    log(f"raw limit: COPY {copy_rows} rows")
    copy = copy_limit(copy_rows, args.customers, run)
    log(f"raw limit: 1-row INSERT+COMMIT transactions for {args.commit_seconds:.0f} s")
    commit = commit_limit(args.commit_seconds, 20_000, args.customers, run)
    log(f"raw limit: {args.redis_calls} Redis GETs")
    redis_result = redis_limit(args.redis_calls)

    stored = count_rows("SELECT count(*) FROM billing_usageevent")
    accounted = batch.items + single.items + (probe.get("events", 0) if probe.get("ok") else 0)
    if "single_rate" in phases:
        accounted += phases["single_rate"].items
    if "soak" in phases:
        accounted += phases["soak"].items
    if not accounted <= stored <= accounted + 40 + (0 if probe.get("ok") else probe.get("events", 0)):
        failures.append(f"database holds {stored} usage events, the API confirmed {accounted} "
                        f"(+ up to 40 warm-up events)")

    if args.drop_db:
        drop_database(DB_NAME)

    batch_eps = batch.items / batch.elapsed if batch.elapsed else None
    single_rps = single.ok / single.elapsed if single.elapsed else None
    check_rps = check.ok / check.elapsed if check.elapsed else None
    b, sgl, chk = batch.summary(), single.summary(), check.summary()
    rate_summary = phases["check_rate"].summary() if "check_rate" in phases else None
    single_rate_summary = phases["single_rate"].summary() if "single_rate" in phases else None
    soak_summary = phases["soak"].summary() if "soak" in phases else None
    measured = [("batch", b), ("single", sgl), ("single_rate", single_rate_summary), ("check", chk),
                ("check_rate", rate_summary), ("soak", soak_summary)]
    for name, summary in measured:
        if summary is None:
            continue
        parts = [summary.get(k) for k in ("app_cpu_cores", "db_cpu_cores", "client_cpu_cores", "steal_cpu_cores",
                                          "machine_cpu_cores")]
        summary["other_cpu_cores"] = None if None in parts else round(max(0.0, parts[4] - sum(parts[:4])), 2)
        if (summary["other_cpu_cores"] or 0) > 0.25:
            notes.append(f"other processes kept {summary['other_cpu_cores']} cores busy during the {name} phase: "
                         f"its figures are lower than on a quiet machine")
        if (summary.get("steal_cpu_cores") or 0) > 0.1:
            notes.append(f"the host took {summary['steal_cpu_cores']} cores from this machine (steal) during the "
                         f"{name} phase: its figures are lower than on a machine of its own")

    def cores(summary: dict) -> str:
        return "/".join(fmt(summary.get(k)) for k in ("app_cpu_cores", "db_cpu_cores", "client_cpu_cores",
                                                      "steal_cpu_cores", "other_cpu_cores"))

    probe_value = probe.get("latency_s")
    if not probe:
        probe_text = ""
    elif probe["ok"]:
        probe_text = f"(info) 200, created={probe['events']}"
    else:
        got = ", ".join(f"HTTP {code}" for code in probe["http_statuses"]) or (probe["error"] or "")[:40]
        probe_text = f"(info) FAILED: {got}"
    rows = [
        ("batch ingestion: events/s (end to end)", batch_eps, "events/s", ratio(batch_eps, copy["rows_per_s"],
                                                                                   "COPY")),
        (f"batch ingestion: request p50 ({args.batch_size} events)", b["latency_p50_ms"], "ms", ""),
        (f"batch ingestion: request p99 ({args.batch_size} events)", b["latency_p99_ms"], "ms", ""),
        (f"batch ingestion: requests (all 200, created={args.batch_size})", batch.ok, "requests", ""),
    ]
    if probe:
        rows.append((f"batch of {probe['events']} events: one request", probe_value, "s", probe_text))
    rows += [
        ("single event: requests/s", single_rps, "req/s", ratio(single_rps, commit["tx_per_s"], "1-row tx")),
        ("single event: p50", sgl["latency_p50_ms"], "ms", ""),
        ("single event: p99", sgl["latency_p99_ms"], "ms", ""),
    ]
    if single_rate_summary is not None:
        rows += [
            (f"single event at {args.single_rate:.0f}/s (open loop): answered",
             single_rate_summary["requests_per_s"], "req/s", f"offered {args.single_rate:.0f}/s"),
            ("single event at that rate: p50", single_rate_summary["latency_p50_ms"], "ms", ""),
            ("single event at that rate: p99", single_rate_summary["latency_p99_ms"], "ms", ""),
        ]
    rows += [
        ("entitlement check: requests/s", check_rps, "req/s", ""),
        ("entitlement check: p50", chk["latency_p50_ms"], "ms", ""),
        ("entitlement check: p99", chk["latency_p99_ms"], "ms", ""),
    ]
    if rate_summary is not None:
        offered = f"offered {args.check_rate:.0f}/s"
        rows += [
            (f"entitlement check at {args.check_rate:.0f}/s (open loop): answered", rate_summary["requests_per_s"],
             "req/s", offered),
            ("entitlement check at that rate: p50", rate_summary["latency_p50_ms"], "ms",
             ratio_text(rate_summary["latency_p50_ms"], redis_result["latency_p50_ms"], "Redis GET p50")),
            ("entitlement check at that rate: p99", rate_summary["latency_p99_ms"], "ms",
             ratio_text(rate_summary["latency_p99_ms"], redis_result["latency_p99_ms"], "Redis GET p99")),
        ]
    rows += [
    ]
    memory = None
    if soak["samples"]:
        first, last = soak["samples"][0][1], soak["samples"][-1][1]
        peak = max(sum(sample.values()) for _, sample in soak["samples"])
        memory = {"seconds": args.soak_seconds, "events": phases["soak"].items,
                  "events_per_s": round(phases["soak"].items / phases["soak"].elapsed, 1),
                  "workers_rss_start_mb": round(sum(first.values()), 1),
                  "workers_rss_end_mb": round(sum(last.values()), 1), "workers_rss_peak_mb": round(peak, 1),
                  "samples": soak["samples"]}
        if phases["soak"].failures:
            failures.append(f"soak: {phases['soak'].failures} failed requests")
        rows += [
            (f"memory: workers' RSS at start of {args.soak_seconds:.0f} s soak", memory["workers_rss_start_mb"], "MB",
             f"{len(first)} gunicorn workers"),
            ("memory: workers' RSS at end of soak", memory["workers_rss_end_mb"], "MB",
             f"peak {memory['workers_rss_peak_mb']} MB; {memory['events_per_s']:,.0f} events/s"),
        ]
    rows += [
        (f"raw: PostgreSQL COPY ({copy['rows']} rows)", copy["rows_per_s"], "rows/s", "the batch limit"),
        ("raw: PostgreSQL 1-row INSERT+COMMIT", commit["tx_per_s"], "tx/s", "the single-event limit"),
        ("raw: Redis GET p50", redis_result["latency_p50_ms"], "ms", ""),
        ("raw: Redis GET p99", redis_result["latency_p99_ms"], "ms", ""),
    ]
    finished_at = datetime.now(timezone.utc)
    commit_id = git("rev-parse", "--short", "HEAD")
    print()
    print(f"Overage ingestion benchmark - commit {commit_id}, {os.cpu_count()} cores, "
          + (f"gunicorn {args.workers} gthread workers x {args.threads} threads, " if args.worker_class == "gthread"
             else f"gunicorn {args.workers} sync workers, ")
          + (f"check server {args.check_workers} asyncio workers, " if args.check_server == "asgi" else "")
          + f"{args.customers} customers, "
          f"load average at start {load_at_start[0]:.2f}")
    print_table(rows)
    print()
    print(f"batch: {args.batch_clients} clients"
          f"{' on disjoint customers' if args.disjoint_batches else ' over the same customers'}, "
          f"{batch.elapsed:.1f} s, {batch.items} events; "
          f"single: {args.single_clients} clients, {single.elapsed:.1f} s, to the "
          f"{'check server' if args.single_server == 'asgi' else 'threaded workers'}; "
          f"check: {args.check_clients} clients, {check.elapsed:.1f} s; "
          f"total run {time.perf_counter() - t0:.0f} s")
    print(f"CPU busy, in cores of {os.cpu_count()} (gunicorn workers / PostgreSQL backends / this client / "
          f"taken by the host (steal) / everything else on the machine): "
          # (a phase skipped with 0 seconds has no CPU figures worth printing)
          + "; ".join(f"{name} {cores(summary)}" for name, summary in measured
                      if summary is not None and (summary.get("elapsed_s") or 0) >= 1))
    for note in notes:
        print(f"note: {note}")

    report = {
        "benchmark": "ingest",
        "git_commit": commit_id,
        "git_worktree_dirty": bool(git("status", "--porcelain")),
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "duration_s": round(time.perf_counter() - t0, 1),
        "setup_s": round(setup_s, 1),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load_at_start],
                    "platform": platform.platform(), "python": platform.python_version()},
        "config": {
            "customers": args.customers, "gunicorn_workers": args.workers, "gunicorn_worker_class": args.worker_class,
            "gunicorn_threads": args.threads if args.worker_class == "gthread" else None,
            "check_server": args.check_server, "check_server_workers": args.check_workers if args.check_server == "asgi"
            else None,
            "group_commit": True,
            "gunicorn_timeout_s": 30, "batch_size": args.batch_size, "batch_clients": args.batch_clients,
            "batch_customers": "disjoint" if args.disjoint_batches else "shared",
            "batch_seconds": args.batch_seconds, "full_batch_probe_events": args.full_batch_probe,
            "single_clients": args.single_clients, "single_seconds": args.single_seconds,
            "single_server": args.single_server, "single_rate": args.single_rate,
            "single_rate_seconds": args.single_rate_seconds,
            "check_clients": args.check_clients, "check_seconds": args.check_seconds,
            "plan": {"included_credits": str(INCLUDED_CREDITS), "overage_unit_price": str(OVERAGE_UNIT_PRICE)},
            "database": f"postgresql {DB_NAME}, DB_CONN_MAX_AGE=600", "debug": False,
        },
        "results": {
            "batch_events_per_s": round(batch_eps, 1) if batch_eps else None,
            "batch_request_p50_ms": b["latency_p50_ms"],
            "batch_request_p99_ms": b["latency_p99_ms"],
            "full_batch_probe": probe or None,
            "single_requests_per_s": round(single_rps, 1) if single_rps else None,
            "single_p50_ms": sgl["latency_p50_ms"],
            "single_p99_ms": sgl["latency_p99_ms"],
            "check_requests_per_s": round(check_rps, 1) if check_rps else None,
            "check_p50_ms": chk["latency_p50_ms"],
            "check_p99_ms": chk["latency_p99_ms"],
            "copy_rows_per_s": copy["rows_per_s"],
            "single_row_commit_tx_per_s": commit["tx_per_s"],
            "redis_get_p50_ms": redis_result["latency_p50_ms"],
            "redis_get_p99_ms": redis_result["latency_p99_ms"],
            "batch_to_copy_ratio": round(batch_eps / copy["rows_per_s"], 5) if batch_eps else None,
            "single_to_commit_ratio": round(single_rps / commit["tx_per_s"], 5) if single_rps else None,
            "memory_soak": memory,
            "check_open_loop": rate_summary,
            "single_open_loop": single_rate_summary,
        },
        "phases": {name: summary for name, summary in measured if summary is not None},
        "raw": {"copy": copy, "single_row_commit": commit, "redis_get": redis_result},
        "usage_events_stored": stored,
        "gunicorn_worker_timeouts": worker_timeouts,
        "notes": notes,
        "failures": failures,
        "ok": not failures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    written = args.output.resolve()
    shown = written.relative_to(ROOT) if written.is_relative_to(ROOT) else written
    print(f"wrote {shown}", flush=True)
    if failures:
        if gunicorn_log:
            sys.stderr.write("--- gunicorn log (tail) ---\n" + gunicorn_log[-3000:] + "\n")
        if checks_log:
            sys.stderr.write("--- check server log (tail) ---\n" + checks_log[-3000:] + "\n")
        print("FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
