"""Group commit for single events: concurrent `POST /api/v1/events` requests in one web
process are recorded together, one transaction for all of them.

A single event costs about twenty statements and a commit whether it travels alone or
with others (see `metering.record_events`), so under load the requests of a process
hand their events to one recorder thread. It takes everything waiting (up to
`OVERAGE_GROUP_COMMIT_MAX_EVENTS`), records it as one batch, and answers each request
with its own result once the transaction has committed: an answered event is durable,
an event whose group failed is not recorded and its request gets the error. Nothing
waits on a timer: alone, an event is recorded at once; under load, the next group
forms while the current one commits.

Web processes do not wait for each other: a group skips the customers another
process's group has locked (`SKIP LOCKED`) and records the rest; the skipped events go
first into the next group. Waiting made the processes' groups take turns whenever their
customers overlapped (most of the time), so two processes recorded no faster than one.
An event skipped `MAX_SKIPS` times, or a group of nothing but skipped events, waits for
the locks as before, so no event is passed over for long.

On with `OVERAGE_GROUP_COMMIT` (production runs gunicorn's threaded workers, so a
process serves several requests at once); off, each request records its own event.
"""

import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from billing.services.metering import BatchResult, EventInput, record_events

logger = logging.getLogger(__name__)

MAX_SKIPS = 2


class EventRecorder:
    """The recorder thread of one process and the queue in front of it."""

    def __init__(self, max_events: int):
        self.max_events = max_events
        self.groups_recorded = 0  # how many transactions served the events (for tests and benchmarks)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held_back: list[tuple[EventInput, Future, int]] = []  # skipped (locked elsewhere), with their skips
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def record(self, event: EventInput, timeout: float = 60) -> BatchResult:
        """Queue `event` and wait until its group has committed (or failed)."""
        return self.submit(event).result(timeout=timeout)

    def submit(self, event: EventInput) -> Future:
        """Queue `event`; the future is done once its group has committed (or failed).
        The check server's event loop awaits it instead of holding a thread."""
        future: Future = Future()
        self._ensure_thread()
        self._queue.put((event, future))
        return future

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="overage-event-recorder", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            group, self._held_back = self._held_back, []
            if not group:
                self._take(group, self._queue.get())
            while len(group) < self.max_events:
                try:
                    self._take(group, self._queue.get_nowait())
                except queue.Empty:
                    break
            if not group:
                continue
            try:
                self._record(group)
            except Exception as error:  # noqa: BLE001 - the thread must outlive any fault, and nobody wait forever
                logger.exception("the event recorder failed on a group of %d events", len(group))
                self._held_back = []
                for _, future, _ in group:
                    _settle(future, error=error)

    @staticmethod
    def _take(group: list, item: tuple[EventInput, Future]) -> None:
        """Add a queued event to the group, unless its request gave up waiting first (a
        cancelled future: the client went away before recording began). Once taken, it
        can no longer be cancelled: it is being recorded and its answer will be set."""
        event, future = item
        if future.set_running_or_notify_cancel():
            group.append((event, future, 0))

    def _record(self, group: list[tuple[EventInput, Future, int]]) -> None:
        close_old_connections()  # as a request would: a connection past its age or broken is replaced
        # Skip what others hold while there is other work to do and nobody has waited long.
        skip_locked = any(skips == 0 for _, _, skips in group) and all(skips < MAX_SKIPS for _, _, skips in group)
        try:
            results = record_events(events=[event for event, _, _ in group], now=timezone.now(),
                                    skip_locked=skip_locked)
        except Exception as error:  # noqa: BLE001 - every waiting request gets it; nothing was committed
            logger.exception("recording a group of %d events failed", len(group))
            if not connection.is_usable():
                connection.close()
            for _, future, _ in group:
                _settle(future, error=error)
            return
        self.groups_recorded += 1
        for (event, future, skips), result in zip(group, results):
            if result.locked_out:
                self._held_back.append((event, future, skips + 1))
            else:
                _settle(future, result=result)


def _settle(future: Future, *, result: BatchResult | None = None, error: BaseException | None = None) -> None:
    """Set a waiting request's answer, once."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # settled meanwhile: nothing more to tell
        pass


_recorder: EventRecorder | None = None
_recorder_lock = threading.Lock()


def event_recorder() -> EventRecorder:
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = EventRecorder(max_events=settings.OVERAGE_GROUP_COMMIT_MAX_EVENTS)
        return _recorder


def record_single_event(event: EventInput) -> BatchResult:
    """Record one event for a request: through the process's recorder thread when group
    commit is on, else directly."""
    if settings.OVERAGE_GROUP_COMMIT:
        return event_recorder().record(event)
    return record_events(events=[event], now=timezone.now())[0]
