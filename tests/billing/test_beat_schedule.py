"""The beat schedule lives in the database (django-celery-beat), editable in the admin."""

import pytest
from django.conf import settings
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

from config.celery import app

pytestmark = pytest.mark.django_db(transaction=True)


def test_beat_installs_every_scheduled_task_as_an_editable_periodic_task():
    app.loader.import_default_modules()  # task autodiscovery, as a worker or beat does
    DatabaseScheduler(app=app)  # what `celery beat` does when it starts

    tasks = dict(PeriodicTask.objects.values_list("name", "task"))

    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert tasks.get(name) == entry["task"]
        assert entry["task"] in app.tasks, f"{entry['task']} is not a registered task"
    close = PeriodicTask.objects.get(name="close-due-periods")
    assert (close.interval.every, close.interval.period, close.enabled) == (300, "seconds", True)
