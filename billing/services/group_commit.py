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

On with `OVERAGE_GROUP_COMMIT` (production runs gunicorn's threaded workers, so a
process serves several requests at once); off, each request records its own event.
"""

import logging
import queue
import threading
from concurrent.futures import Future

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from billing.services.metering import BatchResult, EventInput, record_events

logger = logging.getLogger(__name__)


class EventRecorder:
    """The recorder thread of one process and the queue in front of it."""

    def __init__(self, max_events: int):
        self.max_events = max_events
        self.groups_recorded = 0  # how many transactions served the events (for tests and benchmarks)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def record(self, event: EventInput, timeout: float = 60) -> BatchResult:
        """Queue `event` and wait until its group has committed (or failed)."""
        future: Future = Future()
        self._ensure_thread()
        self._queue.put((event, future))
        return future.result(timeout=timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="overage-event-recorder", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self.max_events:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._record(group)

    def _record(self, group: list[tuple[EventInput, Future]]) -> None:
        close_old_connections()  # as a request would: a connection past its age or broken is replaced
        try:
            results = record_events(events=[event for event, _ in group], now=timezone.now())
        except Exception as error:  # noqa: BLE001 - every waiting request gets it; nothing was committed
            logger.exception("recording a group of %d events failed", len(group))
            if not connection.is_usable():
                connection.close()
            for _, future in group:
                future.set_exception(error)
            return
        self.groups_recorded += 1
        for (_, future), result in zip(group, results):
            future.set_result(result)


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
