from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self):
        from billing.services.positions import connect_signals
        from billing.services.stripe_sync import configure_sdk

        configure_sdk()
        connect_signals()
