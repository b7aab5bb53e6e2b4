"""Who may see what: a portal user belongs to exactly one customer account, and every
portal view and partial reads that account only."""

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import Http404
from django_htmx.http import HttpResponseClientRedirect

from billing.models import Customer


def customer_of(request) -> Customer:
    """The logged-in user's customer account; 404 for users without one (staff, say),
    so nothing about any account is revealed."""
    membership = getattr(request.user, "customer_membership", None)
    if membership is None:
        raise Http404("No customer account for this login.")
    return membership.customer


def portal_login_required(view):
    """`login_required` for portal views. An htmx request from a visitor who is not
    logged in (the dashboard's poll after logging out in another tab) gets an
    `HX-Redirect` to the login page instead of a 302, which htmx would follow and swap
    the login form into the polled fragment; the page's own URL is the `next`."""
    protected = login_required(view)

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.htmx and not request.user.is_authenticated:
            page = request.htmx.current_url_abs_path or request.get_full_path()
            return HttpResponseClientRedirect(redirect_to_login(page)["Location"])
        return protected(request, *args, **kwargs)

    return wrapper
