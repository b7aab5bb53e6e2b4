from django.db import migrations, models
from django.db.models import Count, Q
from django.db.models.functions import TruncDate


def count_overage_events(apps, schema_editor):
    """Existing rollups: count their events that had overage, from the events."""
    UsageEvent = apps.get_model("billing", "UsageEvent")
    UsageRollup = apps.get_model("billing", "UsageRollup")
    counts = (
        UsageEvent.objects.filter(status="accepted", overage_credits__gt=0, period__isnull=False).order_by()
        .annotate(day=TruncDate("timestamp")).values("period_id", "feature_id", "day")
        .annotate(n=Count("pk", filter=Q(overage_credits__gt=0)))
    )
    for row in counts.iterator():
        UsageRollup.objects.filter(period_id=row["period_id"], feature_id=row["feature_id"],
                                   day=row["day"]).update(overage_events=row["n"])


class Migration(migrations.Migration):

    dependencies = [
        ("billing", "0004_period_included_credits_level"),
    ]

    operations = [
        migrations.AddField(
            model_name="usagerollup",
            name="overage_events",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(count_overage_events, migrations.RunPython.noop),
    ]
