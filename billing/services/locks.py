from django.db import transaction

from billing.models import Customer
from billing.services import rows
from billing.services.positions import customers_changed


def lock_customer(customer_id: int) -> Customer:
    """Lock one customer's row for the rest of the transaction.

    Every change to a customer's credits happens under this lock, so concurrent
    consumers, reservations and period openings for the same customer run one after
    another while different customers proceed in parallel. Code that must lock
    several customers locks them in primary-key order (see `lock_customers`) so two
    transactions can never wait on each other.
    """
    assert transaction.get_connection().in_atomic_block, "lock_customer needs a transaction"
    customer = Customer.objects.select_for_update().get(pk=customer_id)
    customers_changed([customer.external_id])  # whoever locks may write: cached positions go
    return customer


def lock_customers(customer_ids, *, skip_locked: bool = False, reads: rows.Together | None = None) -> dict[int, Customer]:
    """Lock several customers in primary-key order. With `skip_locked`, customers another
    transaction holds are left out (not waited for) and missing from the answer. With
    `reads`, the lock is queued there (reads queued after it read under it) and the
    answer is filled when they run."""
    assert transaction.get_connection().in_atomic_block, "lock_customers needs a transaction"
    ids = sorted(set(customer_ids))
    locked: dict[int, Customer] = {}

    def taken(customers):
        locked.update((c.pk, c) for c in customers)
        customers_changed([c.external_id for c in customers])  # whoever locks may write: cached positions go

    # By hand (`rows`): a group of single events takes its customers' locks here.
    with rows.queued(reads) as queue:
        queue.fetch(Customer, *rows.one_of("id", ids, "bigint"), order_by="id", for_update=True,
                    skip_locked=skip_locked, then=taken)
    return locked
