"""A real Celery worker on the real Redis broker, for the few tests that prove the queue end to end.

Used inside TransactionTestCase: the worker thread has its own database connection and sees only committed rows.
"""

import contextlib

import celery.contrib.testing.tasks  # noqa: F401  registers celery.ping for the worker's start-up check
from celery.contrib.testing.worker import start_worker

from lanhub.celery import app


@contextlib.contextmanager
def real_worker(concurrency: int = 1):
    # Tasks left in the queue by an earlier run would act on this run's rows: start from an empty queue.
    app.control.purge()
    with start_worker(app, pool="threads", concurrency=concurrency, perform_ping_check=True,
                      shutdown_timeout=30, loglevel="WARNING") as worker:
        yield worker
    app.control.purge()
