from decimal import Decimal

from django.db import migrations, models
from django.db.models import F


def backfill_level(apps, schema_editor):
    # Existing periods start at the allotment they were opened with.
    BillingPeriod = apps.get_model("billing", "BillingPeriod")
    BillingPeriod.objects.update(included_credits_level=F("included_credits"))


class Migration(migrations.Migration):

    dependencies = [
        ("billing", "0003_webhookdelivery_webhook_deliveries_due"),
    ]

    operations = [
        migrations.AddField(
            model_name="billingperiod",
            name="included_credits_level",
            field=models.DecimalField(decimal_places=6, default=Decimal("0"), max_digits=24),
        ),
        migrations.RunPython(backfill_level, migrations.RunPython.noop),
    ]
