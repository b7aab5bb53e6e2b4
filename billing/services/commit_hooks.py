"""Work that must wait until the current transaction commits, and Celery tasks sent then."""

import logging
import time

from django.conf import settings
from django.db import transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)


def after_commit(func, *args, **kwargs) -> None:
    """Call `func(*args, **kwargs)` once the transaction commits (at once outside one); if
    it raises, the error is logged and the commit stands. A named closure rather than
    functools.partial: Django's robust on_commit logs the callback's __qualname__, which
    a partial lacks, and would raise that AttributeError instead of the real error."""

    def callback():
        func(*args, **kwargs)

    callback.__qualname__ = getattr(func, "__qualname__", repr(func))
    transaction.on_commit(callback, robust=True)


def enqueue(task, *args, **options) -> None:
    """Send a Celery task once the current transaction commits. When the broker cannot
    be reached the task is kept in the database (`DeferredTask`) and sent by
    `requeue_deferred_tasks` once it can: the commit stands, the request is not held up
    by connection retries, and the follow-up is not lost (every task is idempotent, so a
    late or repeated one is harmless)."""
    after_commit(send_task, task, args, options)


# Until when (time.time()) this process skips the broker after a failed send, so that a
# batch with many follow-ups pays one connection failure, not one per task.
_broker_down_until = 0.0


def send_task(task, args: tuple, options: dict) -> None:
    if task.app.conf.task_always_eager:  # embedded mode: runs here and now
        task.apply_async(args, **options)
        return
    if not send_now(task, args, options):
        _defer(task, args, options)


def send_now(task, args: tuple, options: dict) -> bool:
    """Send `task` to the broker now; False if the broker is down (known from an earlier
    failure, or this one), and nothing is kept: the caller decides what else to do."""
    global _broker_down_until
    if time.time() < _broker_down_until:
        return False
    try:
        task.apply_async(args, retry=False, **options)
    except OperationalError:
        _broker_down_until = time.time() + settings.OVERAGE_BROKER_RETRY_SECONDS
        logger.warning("broker unreachable: %s not sent; retried after %s s", task.name,
                       settings.OVERAGE_BROKER_RETRY_SECONDS, exc_info=True)
        return False
    return True


def prepare_to_send_tasks(app) -> None:
    """Pay a process's first task send up front: loading the result backend, connecting
    to the broker and declaring the queue cost ~60 ms of CPU (measured), which the check
    server would otherwise spend beside its event loop on its first refresh ahead. In
    embedded mode (tasks run where they are sent) there is nothing to prepare."""
    if app.conf.task_always_eager:
        return
    app.backend  # noqa: B018 - loaded on first use, by scanning installed entry points
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)
        producer.maybe_declare(app.amqp.queues[app.conf.task_default_queue])


def _defer(task, args: tuple, options: dict) -> None:
    from billing.models import DeferredTask

    DeferredTask.objects.create(task=task.name, args=list(args), options=options)


def requeue_deferred_tasks(*, app=None, limit: int = 1000) -> int:
    """Send the tasks kept while the broker was down, oldest first; returns how many.
    Rows are deleted in the transaction that sent them: if the broker fails half-way the
    whole chunk stays and is sent again later (a task sent twice does nothing twice)."""
    from billing.models import DeferredTask

    if app is None:
        from celery import current_app as app
    with transaction.atomic():
        rows = list(DeferredTask.objects.select_for_update(skip_locked=True).order_by("id")[:limit])
        for row in rows:
            app.send_task(row.task, args=row.args, retry=False, **row.options)
        DeferredTask.objects.filter(pk__in=[row.pk for row in rows]).delete()
    return len(rows)
