import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_wsgi_application()

# The entitlement check's plain case is answered in front of Django's stack (see
# billing/api/fast_lane.py); every other request goes to Django unchanged.
from billing.api.fast_lane import EntitlementCheckFastLane  # noqa: E402 - needs Django set up

application = EntitlementCheckFastLane(django_application)

# Everything loaded so far (Django, the apps, the URL conf) lives as long as the process:
# moved out of the garbage collector's generations, so that a full collection does not
# walk it again. Full collections paused a web process for 80-130 ms (a check's p99).
gc.collect()
gc.freeze()
