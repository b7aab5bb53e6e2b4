"""In-app notifications (alerts), newest first; the header shows the unread count."""

from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import path
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.models import Notification
from billing.services.preferences import notifications_mark_read
from portal.access import customer_of, portal_login_required


@portal_login_required
def notifications(request):
    customer = customer_of(request)
    page = Paginator(Notification.objects.filter(customer=customer), 25).get_page(request.GET.get("page"))
    return render(request, "portal/notifications.html", {"customer": customer, "page": page})


@portal_login_required
@require_POST
def mark_read(request):
    customer = customer_of(request)
    notification_id = request.POST.get("notification")
    notifications_mark_read(customer=customer, now=timezone.now(),
                            notification_id=int(notification_id) if notification_id and notification_id.isdigit()
                            else None)
    return redirect("portal:notifications")


urlpatterns = [
    path("notifications/", notifications, name="notifications"),
    path("notifications/read/", mark_read, name="notifications-read"),
]
