"""Admin of the billing app, one module per topic (Django imports this package)."""

from . import core  # noqa: F401
from . import alerts  # noqa: F401
from . import invoices  # noqa: F401
from . import revenue  # noqa: F401
