"""Admin for the revenue journal: the rows, read-only, and the monthly report."""

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from billing.models import RevenueEntry
from billing.selectors_revenue import parse_month, revenue_report
from billing.services.revenue import recognise_revenue

from .core import ReadOnlyAdmin

REPORT_ROWS = [
    ("billed", "Billed (invoices issued, not void)"),
    ("opening", "Deferred revenue, opening"),
    ("deferred_in", "+ Deferred in (credits paid or billed)"),
    ("rolled_over_net", "± Rollover transfers (net)"),
    ("recognised", "− Recognised on consumption"),
    ("breakage", "− Breakage (credits expired)"),
    ("closing", "Deferred revenue, closing"),
    ("overage", "Overage recognised (period of use)"),
    ("revenue", "Revenue recognised (consumption + breakage + overage)"),
]


@admin.register(RevenueEntry)
class RevenueEntryAdmin(ReadOnlyAdmin):
    list_display = ("recognised_at", "customer", "kind", "amount", "currency", "grant", "ledger_entry", "invoice_line")
    list_filter = ("kind", "currency")
    date_hierarchy = "recognised_at"
    search_fields = ("customer__external_id", "customer__name")
    list_select_related = ("customer", "grant", "ledger_entry", "invoice_line")
    change_list_template = "admin/billing/revenueentry/change_list.html"

    def get_urls(self):
        report = path("report/", self.admin_site.admin_view(self.report_view), name="billing_revenueentry_report")
        return [report, *super().get_urls()]

    def report_view(self, request):
        """The monthly report, with the numbers of `manage.py revenue_report`: the
        journal is brought up to date first (idempotent), then one selector sums it."""
        now = timezone.now()
        error = None
        try:
            month = parse_month(request.GET.get("month") or f"{now:%Y-%m}")
        except ValueError as problem:
            error, month = str(problem), now.date().replace(day=1)
        currency = (request.GET.get("currency") or "").upper() or None
        recognise_revenue(now=now)
        reports = revenue_report(month=month, currency=currency)
        table = [
            {"label": label, "figures": [report.rounded()[name] for report in reports]}
            for name, label in REPORT_ROWS
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Revenue report {month:%Y-%m}",
            "month": f"{month:%Y-%m}",
            "currency": currency or "",
            "error": error,
            "reports": reports,
            "table": table,
            "unbalanced": [report for report in reports if not report.balances],
        }
        return TemplateResponse(request, "admin/billing/revenueentry/report.html", context)
