"""Work that must wait until the current transaction commits."""

from django.db import transaction


def after_commit(func, *args, **kwargs) -> None:
    """Call `func(*args, **kwargs)` once the transaction commits (at once outside one); if
    it raises, the error is logged and the commit stands. A named closure rather than
    functools.partial: Django's robust on_commit logs the callback's __qualname__, which
    a partial lacks, and would raise that AttributeError instead of the real error."""

    def callback():
        func(*args, **kwargs)

    callback.__qualname__ = getattr(func, "__qualname__", repr(func))
    transaction.on_commit(callback, robust=True)
