"""The Celery app: Redis as broker and result store, tasks found in every installed app.

Periodic work (drift repair, status polls, CRL renewal) is scheduled here and carried out by nodes/tasks.py.
"""

import os

from celery import Celery
from celery.signals import beat_init, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lanhub.settings")

app = Celery("lanhub")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _refuse_unsafe(process: str) -> None:
    # Celery never runs Django's system checks; a worker with the development LANHUB_KEY would unseal real keys.
    # Celery logs and ignores an ordinary exception from a signal handler, so the refusal leaves as SystemExit.
    from django.core.exceptions import ImproperlyConfigured

    from lanhub.checks import refuse_unsafe_start

    try:
        refuse_unsafe_start(process)
    except ImproperlyConfigured:
        raise SystemExit(78) from None  # EX_CONFIG


@worker_init.connect
def refuse_unsafe_worker(**kwargs):
    _refuse_unsafe("worker")


@beat_init.connect
def refuse_unsafe_beat(**kwargs):
    _refuse_unsafe("beat")


@app.on_after_finalize.connect
def setup_periodic_tasks(sender, **kwargs):
    from django.conf import settings

    sender.add_periodic_task(settings.LANHUB_STATUS_INTERVAL, sender.signature("nodes.tasks.poll_all_status"),
                             name="poll status of every node")
    sender.add_periodic_task(settings.LANHUB_DRIFT_INTERVAL, sender.signature("nodes.tasks.check_all_drift"),
                             name="repair drift on every node")
    sender.add_periodic_task(settings.LANHUB_CRL_RENEW_INTERVAL, sender.signature("nodes.tasks.renew_crls"),
                             name="renew CRLs before they lapse")
    sender.add_periodic_task(24 * 3600, sender.signature("nodes.tasks.prune_runs"), name="prune old sync runs")


@app.task(name="lanhub.ping")
def ping() -> str:
    """Answers 'pong': a quick end-to-end check of broker, worker and result store from a shell."""
    return "pong"
