"""The check server (billing/api/check_server.py): plain entitlement checks answered on
gunicorn's asyncio worker, every other request by the WSGI application in threads.

    gunicorn config.asgi:application --worker-class asgi --workers 2
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.wsgi import application as wsgi_application  # noqa: E402 - sets Django up; the fast lane in front

from billing.api.check_server import CheckServer  # noqa: E402

application = CheckServer(wsgi_application)
