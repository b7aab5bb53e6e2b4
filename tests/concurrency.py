"""Run a function from many threads at once, each with its own database connection."""

import threading
from concurrent.futures import ThreadPoolExecutor

from django.db import connections


def run_concurrently(fn, calls: list[tuple]) -> list:
    """Call fn(*args) for every args in `calls`, all released together by a barrier.
    Returns results (or the exception raised) in call order."""
    barrier = threading.Barrier(len(calls))

    def worker(args):
        try:
            barrier.wait()
            return fn(*args)
        except Exception as error:  # returned, so the test can assert on it
            return error
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(worker, calls))
