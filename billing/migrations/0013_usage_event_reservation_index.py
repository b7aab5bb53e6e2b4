"""The index of events by reservation, only where one is set (most events settle none),
built without locking the events table on PostgreSQL (CREATE INDEX CONCURRENTLY, hence
not atomic); 0014 then drops the full index it replaces."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models
from django.db.migrations.operations import AddIndex


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY on PostgreSQL, a plain CREATE INDEX elsewhere (SQLite)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ('billing', '0012_email_sent_once'),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name='usageevent',
            index=models.Index(condition=models.Q(('reservation__isnull', False)), fields=['reservation'],
                               name='usage_event_reservation'),
        ),
    ]
