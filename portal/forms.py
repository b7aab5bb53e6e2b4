"""Portal forms: input checks a customer can fix inline; the billing services remain
the authority (their DomainErrors are shown on the same form)."""

from decimal import Decimal

from django import forms

from billing.models import AutoTopUp
from plans.models import CreditPack


class PackPurchaseForm(forms.Form):
    pack = forms.CharField(max_length=64)
    # Generated when the page is rendered: a double-clicked or resubmitted form carries
    # the same key, and purchase_pack returns the first purchase instead of buying again.
    idempotency_key = forms.UUIDField(widget=forms.HiddenInput)


MAX_TOPUPS_PER_MONTH = 1000


class AutoTopUpForm(forms.Form):
    # The decimal fields' digits fit their columns (plans.money: credits 24 digits with
    # 6 places, money 20 with 4), so nothing a form accepts can overflow them.
    enabled = forms.BooleanField(required=False, label="Top up automatically")
    mode = forms.ChoiceField(choices=AutoTopUp.Mode.choices, initial=AutoTopUp.Mode.PACK, label="Mode")
    pack = forms.ModelChoiceField(queryset=CreditPack.objects.none(), to_field_name="code", label="Pack")
    threshold = forms.DecimalField(min_value=Decimal("0"), max_digits=20, decimal_places=6,
                                   label="When credits left fall below")
    target_balance = forms.DecimalField(required=False, min_value=Decimal("0"), max_digits=20, decimal_places=6,
                                        label="Refill to (refill mode)")
    # Bounded well inside the column (a PostgreSQL integer): a larger number would not
    # be saved at all, and no one needs more than 1 000 top-ups a month.
    max_per_month = forms.IntegerField(required=False, min_value=1, max_value=MAX_TOPUPS_PER_MONTH,
                                       label="At most this many top-ups a month")
    max_amount_per_month = forms.DecimalField(required=False, min_value=Decimal("0"), max_digits=14, decimal_places=2,
                                              label="At most this much money a month")

    def __init__(self, *args, packs, **kwargs):
        super().__init__(*args, **kwargs)
        # Rules across fields (a refill target above the threshold) are the service's:
        # its DomainError lands on this form, so the two cannot disagree.
        self.fields["pack"].queryset = packs
