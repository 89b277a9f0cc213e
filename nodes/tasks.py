"""Celery tasks: take a primary key, re-fetch, call a service. Retries live here; the logic does not."""

import logging

from celery import shared_task
from django.conf import settings
from django.db import OperationalError

from nodes import presence, runs, services, syncing
from nodes.models import Lan, Node

log = logging.getLogger(__name__)

# Connection errors back off 5, then 10 s before the run is left failed (the drift check tries a ready node again
# later). Not more: every kind of connection failure is retried alike, and five quick retries against a closed
# port would make the worker a patient port scanner.
RETRY_BACKOFF = 5
MAX_RETRIES = 2


# A database that is briefly busy (a locked SQLite file, a failover) is retried too: the run stays queued meanwhile.
@shared_task(bind=True, acks_late=True, max_retries=MAX_RETRIES, autoretry_for=(OperationalError,),
             retry_backoff=2)
def sync_node(self, node_id: int, run_id: int | None = None) -> str:
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        return "gone"  # deleted after it was queued
    run = syncing.run_sync(node, run_id=run_id)
    if run.status == "failed" and run.retryable and self.request.retries < self.max_retries:
        retry_run = runs.queue_retry(run)
        if retry_run is not None:
            raise self.retry(args=(node_id, retry_run.pk), countdown=RETRY_BACKOFF * 2**self.request.retries)
    return run.status


@shared_task(acks_late=True)
def poll_status(node_id: int) -> str:
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        return "gone"
    return syncing.poll_status(node)


@shared_task
def poll_all_status() -> int:
    ids = presence.due_for_poll(Node.objects.exclude(state="new").values_list("pk", flat=True))
    for node_id in ids:
        # A poll that waited out a worker outage is worthless: let it expire rather than pile up.
        poll_status.apply_async((node_id,), expires=settings.LANHUB_STATUS_INTERVAL)
    return len(ids)


@shared_task(acks_late=True)
def check_drift(node_id: int) -> str:
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        return "gone"
    return syncing.run_sync(node, kind="drift").status


@shared_task
def check_all_drift() -> int:
    runs.requeue_stale_runs()
    ids = list(Node.objects.filter(state="ready", healthy=True).values_list("pk", flat=True))
    for node_id in ids:
        check_drift.apply_async((node_id,), expires=settings.LANHUB_DRIFT_INTERVAL)
    return len(ids)


@shared_task
def renew_crls() -> int:
    """Renew what would expire: node certificates of older LANs that still carry a date, with less than a year
    left (new ones have none, and the nodes revoke through a directory that never expires), and the LAN's signed
    CRL record."""
    renewed = 0
    for lan in Lan.objects.all():
        try:  # one broken LAN must not keep the others' certificates from being renewed
            renewed += len(services.renew_node_certificates(lan))
            renewed += services.renew_crl(lan)
        except Exception:
            log.exception("certificate renewal of LAN %s failed", lan.pk)
    return renewed


@shared_task
def prune_runs() -> int:
    return runs.prune_runs()
