"""Refresh ahead: work that keeps a process's caches warm, done in one background thread
of the process, at most once at a time per key.

Checks answered from a cache (credit positions, API keys) would otherwise all find the
entry expired in the same instant and rebuild it on their own paths: every request of
that instant waits for the database, and on the check server's event loop they all
fall back to threads at once (a stall of 50-100 ms every 5 s when the API key's cache
entry expired). Callers keep serving the entry while it is still within its hard limit
and ask for a refresh from a soft limit on; a failure is logged and the entry then
expires at its hard limit as before.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)

_pending: set[str] = set()  # keys queued or running in this process
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def refresh_later(key: str, refresh: Callable[[], None]) -> None:
    """Run `refresh` in the background unless a refresh of `key` is already pending."""
    global _executor
    with _lock:
        if key in _pending:
            return
        _pending.add(key)
        if _executor is None:  # made on first use: after gunicorn's fork, in the process that uses it
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overage-refresh-ahead")
        executor = _executor
    try:
        executor.submit(_run, key, refresh)
    except RuntimeError:  # the interpreter is shutting down
        with _lock:
            _pending.discard(key)


def drained() -> Future:
    """A future done once everything queued so far has run (tests)."""
    with _lock:
        executor = _executor
    if executor is None:
        done: Future = Future()
        done.set_result(None)
        return done
    return executor.submit(lambda: None)


def _run(key: str, refresh: Callable[[], None]) -> None:
    from django.db import close_old_connections

    # As around a request: the thread's connection is kept for DB_CONN_MAX_AGE and replaced
    # when broken (a new PostgreSQL connection for every refresh, a few a second, cost
    # more than the refreshes and stalled the checks beside them).
    close_old_connections()
    try:
        refresh()
    except Exception:  # noqa: BLE001 - an optimisation; never raise into the executor
        logger.warning("could not refresh %s ahead of its expiry", key, exc_info=True)
    finally:
        close_old_connections()
        with _lock:
            _pending.discard(key)
