from billing.models import Notification


def unread_notifications(request) -> dict:
    """The unread count shown in the header, for logged-in customers."""
    membership = getattr(getattr(request, "user", None), "customer_membership", None)
    if membership is None:
        return {}
    return {"unread_notifications": Notification.objects.filter(customer_id=membership.customer_id,
                                                                read_at__isnull=True).count()}
