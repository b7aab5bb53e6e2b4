"""What the chaos tests drive: the app's real processes (gunicorn in production mode, a
celery worker on Redis) pointed at the pytest test database, the two services they
depend on (PostgreSQL, Redis) and the faults applied to all of them, plus an HTTP load
of clients that remember every answer each event id got.

Everything here acts on real processes and real state: the only waiting is for another
process to answer or for a row or a Redis key to appear (polled), and the fault schedule
runs in wall-clock time because the processes under test live in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psycopg
import redis
from celery import Celery
from django.db import connection

from tests import redis_support

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/10"  # the processes' Celery broker (flushed at start)
CACHE_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/11"  # their cache (flushed at start)
WEB_APP_NAME = "overage-chaos-web"  # PostgreSQL application_name of each kind of process
WORKER_APP_NAME = "overage-chaos-worker"
CLOSE_DUE_TASK = "billing.tasks.close_due_periods_task"
# Closes go to a queue of their own (the chunks follow the run there), as a deployment
# with workers for closing would have it: behind the default queue's follow-up tasks
# (alerts, progressive billing), a close under this load would wait for minutes.
CLOSE_QUEUE = "chaos-close"


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Services: PostgreSQL and Redis ---------------------------------------------------------

def database_url(application_name: str | None = None) -> str:
    """A URL of the pytest test database (pytest-django's `test_` one), for other processes."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return f"{url}?application_name={application_name}" if application_name else url


def _pg_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster on the test database's port, if pg_ctlcluster
    manages one (what the restart fault needs)."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return None
    db = connection.settings_dict
    if (db["HOST"] or "127.0.0.1") not in ("127.0.0.1", "localhost"):
        return None
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == str(db["PORT"] or 5432):
            return parts[0], parts[1]
    return None


def services_restartable() -> str | None:
    """Why the chaos tests cannot run here (None if they can)."""
    if connection.vendor != "postgresql":
        return "needs PostgreSQL"
    if _pg_cluster() is None:
        return "needs a local PostgreSQL cluster managed by pg_ctlcluster (it is restarted)"
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return "needs redis-server and redis-cli on this machine (Redis is restarted)"
    if not redis_up():
        return f"needs Redis on {REDIS_HOST}:{REDIS_PORT}"
    return None


def pg_up() -> bool:
    try:
        with psycopg.connect(database_url(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_up() -> bool:
    return redis_support.redis_up(BROKER_URL)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)  # polling another process's state


def restart_postgres(mode: str = "fast") -> None:
    """Restart the cluster: every session is ended (`fast`), or the server is killed with no
    checkpoint and recovers from its WAL on start (`immediate`, a crash). After a crash
    PostgreSQL first fsyncs every file of the data directory (a minute on a machine with
    many databases); `syncfs` makes that one call per file system, as safe on Linux."""
    version, name = _pg_cluster()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "stop", "-m", mode],
                   check=True, capture_output=True, timeout=60)
    start = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"]
    if mode == "immediate" and sys.platform == "linux":
        started = subprocess.run(start + ["--", "-o", "-c recovery_init_sync_method=syncfs"],
                                 capture_output=True, timeout=120)
        if started.returncode != 0 and not pg_up():
            subprocess.run(start, check=True, capture_output=True, timeout=120)
    else:
        subprocess.run(start, check=True, capture_output=True, timeout=120)
    wait_for(pg_up, "PostgreSQL back after restart", 120)


def start_redis() -> None:
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", REDIS_HOST, "--port", str(REDIS_PORT),
                    "--save", "", "--appendonly", "no"], check=True, capture_output=True, timeout=30)
    wait_for(redis_up, "Redis back after restart", 30)


def restart_redis() -> None:
    """Shut Redis down without saving (what it holds is gone, as after a crash of a Redis
    without persistence) and start it again."""
    subprocess.run(["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "shutdown", "nosave"],
                   capture_output=True, timeout=30)
    wait_for(lambda: not redis_up(), "Redis down", 15)
    start_redis()


def ensure_services_up() -> None:
    """PostgreSQL and Redis running again, whatever happened (used in `finally`)."""
    if not pg_up():
        version, name = _pg_cluster()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"],
                       capture_output=True, timeout=60)
        wait_for(pg_up, "PostgreSQL up", 60)
    if not redis_up():
        start_redis()


def flush_redis_dbs() -> None:
    for url in (BROKER_URL, CACHE_URL):
        redis.Redis.from_url(url).flushdb()


def terminate_app_backends(names=(WEB_APP_NAME, WORKER_APP_NAME)) -> tuple[int, int]:
    """pg_terminate_backend on every session of the app's processes. Returns (sessions
    ended, of which in a transaction at that moment)."""
    with psycopg.connect(database_url(), autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid, xact_start IS NOT NULL FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = ANY(%s) AND pid <> pg_backend_pid()", (list(names),)).fetchall()
        for pid, _ in rows:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(rows), sum(1 for _, in_transaction in rows if in_transaction)


def execute(sql: str) -> None:
    with psycopg.connect(database_url(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def scalar(sql: str, params=(), *, patience: float = 60) -> object:
    """One value from the test database on a fresh connection (the pytest process's own may
    have been ended by a fault); retried while PostgreSQL is being restarted by another."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with psycopg.connect(database_url(), autocommit=True, connect_timeout=5) as conn:
                return conn.execute(sql, params).fetchone()[0]
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # PostgreSQL restarting


# --- The app's processes ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(application_name: str, **extra: str) -> dict[str, str]:
    """Production mode (DEBUG off), PostgreSQL = the test database, Redis as broker and
    cache on databases of their own, no Stripe."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("STRIPE_", "DATABASE_URL", "REDIS_URL", "CELERY_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DEBUG": "0",
        "SECRET_KEY": "chaos-" + os.urandom(16).hex(),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "0",  # plain http on 127.0.0.1; everything else as in production
        "DATABASE_URL": database_url(application_name),
        "DB_CONN_MAX_AGE": "60",
        "REDIS_URL": CACHE_URL,
        "CELERY_BROKER_URL": BROKER_URL,
        "OVERAGE_GROUP_COMMIT": "1",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Process:
    """A process started in a session of its own, so it and its children can be signalled
    (and, at the end, killed) together."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "a") as out:
            out.write(f"\n--- start {self.starts} at {time.strftime('%H:%M:%S')} ---\n")
            out.flush()
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and every process of its session."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=15)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a graceful stop); SIGKILL what is left of the session after `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the session
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=15)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Web(Process):
    """gunicorn as the README runs it without a check server: 2 gthread workers, single
    events sharing transactions (group commit)."""

    def __init__(self, log_dir: Path, api_key: str, workers: int = 2, threads: int = 16, **extra_env: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        super().__init__("gunicorn", [
            str(VENV_BIN / "gunicorn"), "config.wsgi", "--workers", str(workers), "--worker-class", "gthread",
            "--threads", str(threads), "--timeout", "60", "--graceful-timeout", "5",
            "--bind", f"127.0.0.1:{self.port}"], app_env(WEB_APP_NAME, **extra_env), log_dir)

    def ready(self) -> bool:
        import requests

        if not self.alive():
            raise RuntimeError(f"gunicorn exited with status {self.proc.returncode}:\n{self.tail()}")
        try:
            response = requests.get(f"{self.base}/api/v1/features", timeout=2, allow_redirects=False,
                                    headers={"Authorization": f"Bearer {self.api_key}"})
        except requests.RequestException:
            return False
        if 300 <= response.status_code < 500:
            raise RuntimeError(f"GET /api/v1/features answered {response.status_code}: {response.text[:300]}")
        return response.status_code == 200

    def start_and_wait(self) -> None:
        self.start()
        wait_for(self.ready, "gunicorn answering", 60)

    def workers(self) -> list[int]:
        return children(self.proc.pid) if self.alive() else []


class Worker(Process):
    """A celery worker (2 prefork processes) on the broker database."""

    def __init__(self, log_dir: Path, **extra_env: str):
        super().__init__("celery", [
            sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "prefork", "--concurrency", "2",
            "-Q", f"celery,{CLOSE_QUEUE}", "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip",
            "--without-mingle"], app_env(WORKER_APP_NAME, **extra_env), log_dir)

    def ready(self) -> bool:
        """Answers a remote-control ping (it consumes its queues)."""
        if not self.alive():
            raise RuntimeError(f"celery worker exited with status {self.proc.returncode}:\n{self.tail()}")
        try:
            with Celery("chaos-probe", broker=BROKER_URL, set_as_current=False) as probe:
                return bool(probe.control.ping(timeout=1))
        except Exception:  # noqa: BLE001 - not up yet, or the broker is restarting
            return False

    def start_and_wait(self) -> None:
        self.start()
        wait_for(self.ready, "celery worker answering a ping", 60)


def send_task(name: str, *, queue: str = "celery", attempts: int = 20) -> None:
    """Queue a task on the processes' broker from a Celery app that is not made current
    (shared tasks of the pytest process must keep following the project's app). Retried
    while the broker is being restarted."""
    for attempt in range(attempts):
        try:
            with Celery("chaos-probe", broker=BROKER_URL, set_as_current=False) as probe:
                probe.send_task(name, queue=queue)
            return
        except Exception:  # noqa: BLE001 - the broker may be mid-restart
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def broker_idle() -> bool:
    """No task waiting in the default queue nor taken and unacknowledged."""
    client = redis.Redis.from_url(BROKER_URL)
    return client.llen("celery") == 0 and client.llen(CLOSE_QUEUE) == 0 and client.hlen("unacked") == 0


def queued_tasks() -> int:
    client = redis.Redis.from_url(BROKER_URL)
    return client.llen("celery") + client.llen(CLOSE_QUEUE)


# --- The load ------------------------------------------------------------------------------

CONNECTION_ERROR = 0  # the status recorded for an attempt that got no HTTP answer


@dataclass
class Outcomes:
    """Every answer each event id got, attempt by attempt (HTTP status of the event — in a
    batch, the per-event `http_status` — or CONNECTION_ERROR)."""

    statuses: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    sent: dict[str, dict] = field(default_factory=dict)  # event id -> the event as sent
    kind: dict[str, str] = field(default_factory=dict)  # event id -> how it was made
    requests: Counter = field(default_factory=Counter)  # request HTTP status (0 = no answer) -> count
    single_requests: int = 0
    batch_requests: int = 0
    resends: int = 0
    error_samples: list[str] = field(default_factory=list)

    def answered(self, event_id: str, status: int) -> None:
        self.statuses[event_id].append(status)

    def ok_ids(self) -> set[str]:
        return {i for i, s in self.statuses.items() if any(200 <= x < 300 for x in s)}

    def refused_ids(self) -> set[str]:
        """Every attempt answered with a 4xx."""
        return {i for i, s in self.statuses.items() if s and all(400 <= x < 500 for x in s)}

    def uncertain_ids(self) -> set[str]:
        return set(self.statuses) - self.ok_ids() - self.refused_ids()


class Load:
    """`clients` concurrent clients posting single events and batches for a bounded time.
    Each request is re-sent once (same body, same event ids) with probability
    `resend_probability`, a moment later; re-sends still due at the deadline go out then."""

    def __init__(self, *, base: str, api_key: str, customers: list[str], feature: str, rng: random.Random,
                 run: str, stale_timestamp: str, late_timestamp: Callable[[], str | None], clients: int = 64,
                 resend_probability: float = 0.5, timeout: float = 20):
        self.base, self.api_key, self.customers, self.feature = base, api_key, customers, feature
        self.rng, self.run, self.clients, self.timeout = rng, run, clients, timeout
        self.stale_timestamp, self.late_timestamp = stale_timestamp, late_timestamp
        self.resend_probability = resend_probability
        self.outcomes = Outcomes()

    def _event(self, client: int, seq: int, index: int) -> dict:
        event_id = f"{self.run}-{client}-{seq}-{index}"
        roll = self.rng.random()
        body = {"id": event_id, "customer": self.rng.choice(self.customers), "feature": self.feature,
                "quantity": str(self.rng.randint(1, 40))}
        kind = "now"
        if roll < 0.02:
            body["customer"], kind = "no-such-customer", "unknown_customer"  # always 404
        elif roll < 0.05:
            body["timestamp"], kind = self.stale_timestamp, "stale"  # a long-closed period: always 4xx
        elif roll < 0.15:
            late = self.late_timestamp()  # just before the boundary: accepted until the period closes
            if late is not None:
                body["timestamp"], kind = late, "late"
        if roll > 0.97:
            body["properties"] = {"region": "eu-west", "n": seq}
        self.outcomes.sent[event_id] = body
        self.outcomes.kind[event_id] = kind
        return body

    async def _post(self, session, path: str, payload: dict, ids: list[str]) -> None:
        import aiohttp

        outcomes = self.outcomes
        try:
            async with session.post(self.base + path, data=json.dumps(payload).encode()) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            outcomes.requests[CONNECTION_ERROR] += 1
            for event_id in ids:
                outcomes.answered(event_id, CONNECTION_ERROR)
            if len(outcomes.error_samples) < 8:
                outcomes.error_samples.append(f"{path}: {type(error).__name__}: {error}")
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))  # a client backs off, as real ones do
            return
        outcomes.requests[status] += 1
        if path.endswith("/batch") and status == 200:
            results = json.loads(raw)["results"]
            assert [r["id"] for r in results] == ids, "batch results out of order"
            for event_id, result in zip(ids, results):
                outcomes.answered(event_id, result["http_status"])
        else:
            for event_id in ids:
                outcomes.answered(event_id, status)
            if status >= 500:
                if len(outcomes.error_samples) < 8:
                    outcomes.error_samples.append(f"{path}: HTTP {status} {raw[:120]!r}")
                await asyncio.sleep(self.rng.uniform(0.1, 0.4))

    async def _client(self, session, client: int, deadline: float) -> None:
        pending: list[tuple[float, str, dict, list[str]]] = []  # (when, path, payload, ids) to re-send once
        seq = 0
        while time.monotonic() < deadline:
            due = [p for p in pending if p[0] <= time.monotonic()]
            if due:
                pending.remove(due[0])
                _, path, payload, ids = due[0]
                self.outcomes.resends += 1
                await self._post(session, path, payload, ids)
                continue
            seq += 1
            if self.rng.random() < 0.7:
                event = self._event(client, seq, 0)
                path, payload, ids = "/api/v1/events", event, [event["id"]]
                self.outcomes.single_requests += 1
            else:
                events = [self._event(client, seq, i) for i in range(self.rng.randint(2, 25))]
                path, payload, ids = "/api/v1/events/batch", {"events": events}, [e["id"] for e in events]
                self.outcomes.batch_requests += 1
            await self._post(session, path, payload, ids)
            if self.rng.random() < self.resend_probability:
                pending.append((time.monotonic() + self.rng.uniform(0, 4), path, payload, ids))
        for _, path, payload, ids in pending:
            self.outcomes.resends += 1
            await self._post(session, path, payload, ids)

    async def run_for(self, seconds: float) -> Outcomes:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(self._client(session, client, deadline) for client in range(self.clients)))
        return self.outcomes


# --- The fault schedule -----------------------------------------------------------------------

@dataclass
class Fault:
    at: float  # seconds after the load starts
    name: str
    action: Callable[[], str]  # applies the fault; returns what happened, for the log


class FaultRunner(threading.Thread):
    """Applies the faults at their times, in order, in a thread beside the load; records
    what each did (or the exception it raised, which fails the test afterwards). A fault
    that takes time (a restart) delays the next one of its runner; runners run side by side."""

    def __init__(self, faults: list[Fault], name: str = "faults"):
        super().__init__(name=f"chaos-{name}", daemon=True)
        self.faults = sorted(faults, key=lambda f: f.at)
        self.applied: list[tuple[float, str, str]] = []
        self.errors: list[str] = []
        self.start_time = 0.0

    def run(self) -> None:
        self.start_time = time.monotonic()
        for fault in self.faults:
            delay = fault.at - (time.monotonic() - self.start_time)
            if delay > 0:
                time.sleep(delay)  # the schedule is in wall-clock time, like the processes it hits
            began = time.monotonic() - self.start_time
            try:
                what = fault.action()
            except Exception as error:  # noqa: BLE001 - reported after the run
                what = f"FAILED: {type(error).__name__}: {error}"
                self.errors.append(f"{fault.name}: {what}")
            self.applied.append((round(began, 1), fault.name, what))
            log(f"t={began:5.1f}s {fault.name}: {what}")
