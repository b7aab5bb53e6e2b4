from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Customer portal"

    def ready(self):
        from portal import login_throttle  # noqa: F401 - connects its login signal receivers
