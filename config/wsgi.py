import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_wsgi_application()

# The entitlement check's plain case is answered in front of Django's stack (see
# billing/api/fast_lane.py); every other request goes to Django unchanged.
from billing.api.fast_lane import EntitlementCheckFastLane  # noqa: E402 - needs Django set up

application = EntitlementCheckFastLane(django_application)
