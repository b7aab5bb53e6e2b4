"""Who may see what: a portal user belongs to exactly one customer account, and every
portal view and partial reads that account only."""

from django.http import Http404

from billing.models import Customer


def customer_of(request) -> Customer:
    """The logged-in user's customer account; 404 for users without one (staff, say),
    so nothing about any account is revealed."""
    membership = getattr(request.user, "customer_membership", None)
    if membership is None:
        raise Http404("No customer account for this login.")
    return membership.customer
