from django.urls import path, re_path

from . import views

urlpatterns = [
    path("features", views.FeatureListCreate.as_view(), name="features"),
    path("plans", views.PlanListCreate.as_view(), name="plans"),
    path("plans/<str:code>", views.PlanDetail.as_view(), name="plan-detail"),
    path("customers", views.CustomerCreate.as_view(), name="customers"),
    path("customers/<str:external_id>", views.CustomerDetail.as_view(), name="customer-detail"),
    path("customers/<str:external_id>/subscription", views.SubscriptionChange.as_view(), name="subscription"),
    path("customers/<str:external_id>/usage", views.CustomerUsage.as_view(), name="customer-usage"),
    path("customers/<str:external_id>/grants", views.CustomerGrantCreate.as_view(), name="customer-grants"),
    path("events", views.EventCreate.as_view(), name="events"),
    path("events/batch", views.EventBatchCreate.as_view(), name="events-batch"),
    path("entitlements/check", views.EntitlementCheck.as_view(), name="entitlement-check"),
    path("reservations/<uuid:reservation_id>/release", views.ReservationRelease.as_view(), name="reservation-release"),
    path("customers/<str:external_id>/invoices", views.CustomerInvoiceList.as_view(), name="customer-invoices"),
    path("customers/<str:external_id>/invoices/upcoming", views.UpcomingInvoice.as_view(), name="upcoming-invoice"),
    path("invoices/<str:number>", views.InvoiceDetail.as_view(), name="invoice-detail"),
    path("packs", views.PackList.as_view(), name="packs"),
    path("customers/<str:external_id>/spend-cap", views.CustomerSpendCap.as_view(), name="spend-cap"),
    path("customers/<str:external_id>/auto-topup", views.CustomerAutoTopUp.as_view(), name="auto-topup"),
    path("customers/<str:external_id>/spend-cap/approvals", views.CustomerCapApproval.as_view(),
         name="spend-cap-approvals"),
    path("customers/<str:external_id>/packs", views.CustomerPackPurchase.as_view(), name="customer-packs"),
    path("invoices/<str:number>/lines/<int:line_id>/usage", views.InvoiceLineUsage.as_view(), name="line-usage"),
    re_path(r"^.*$", views.api_not_found),  # last: anything else under /api/v1/
]
