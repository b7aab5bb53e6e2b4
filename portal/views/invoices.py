"""Invoices: the list, one invoice with every line, and the usage behind an overage
line. Every lookup is scoped to the logged-in customer, so another account's invoice
number is a 404, not a hint that it exists."""

from decimal import Decimal

from django.shortcuts import get_object_or_404, render
from django.urls import path

from billing.models import Invoice, InvoiceLine
from billing.selectors import overage_line_usage
from portal.access import customer_of, portal_login_required


def unit_price_text(rate, currency: str) -> str:
    """A per-credit rate in full (`USD 0.002`): rates have more places than money."""
    return f"{currency} {Decimal(rate).normalize():f}"


@portal_login_required
def invoice_list(request):
    customer = customer_of(request)
    invoices = Invoice.objects.filter(customer=customer).select_related("period")
    return render(request, "portal/invoices.html", {"customer": customer, "invoices": invoices})


@portal_login_required
def invoice_detail(request, number: str):
    customer = customer_of(request)
    invoice = get_object_or_404(Invoice.objects.select_related("period", "period__plan"),
                                customer=customer, number=number)
    lines = list(invoice.lines.all())
    for line in lines:
        line.unit_price_text = unit_price_text(line.unit_price, invoice.currency) if line.unit_price is not None else ""
        line.tier_rows = [
            {"lower": Decimal(t["lower"]), "upper": None if t["upper"] is None else Decimal(t["upper"]),
             "credits": Decimal(t["credits"]), "unit_price": unit_price_text(t["unit_price"], invoice.currency),
             "amount": Decimal(t["amount"])}
            for t in line.tiers
        ] if len(line.tiers) > 1 or line.unit_price is None else []
    return render(request, "portal/invoice.html", {"customer": customer, "invoice": invoice, "lines": lines})


@portal_login_required
def invoice_line(request, number: str, line_id: int):
    customer = customer_of(request)
    line = get_object_or_404(InvoiceLine.objects.select_related("invoice", "period"),
                             pk=line_id, invoice__number=number, invoice__customer=customer,
                             kind=InvoiceLine.Kind.OVERAGE)
    usage = overage_line_usage(line)
    return render(request, "portal/invoice_line.html", {
        "customer": customer, "invoice": line.invoice, "line": line, "usage": usage,
        # The latest events first would hide how the band filled up; keep time order, capped.
        "entries": usage.entries[:200], "entry_count": usage.event_count,
    })


urlpatterns = [
    path("invoices/", invoice_list, name="invoices"),
    path("invoices/<str:number>/", invoice_detail, name="invoice"),
    path("invoices/<str:number>/lines/<int:line_id>/", invoice_line, name="invoice-line"),
]
