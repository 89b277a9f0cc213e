"""Run bookkeeping: request a sync, send its task after commit, claim a node, retry, sweep and prune runs.

At most one sync runs per node: the node row is claimed with a conditional UPDATE, so a redelivered or duplicate
task finds it taken and leaves its run queued for the running sync to pick up when it ends. Every run leaves a
SyncRun row (queued, running, then completed / failed / errored / skipped).

The task is sent by name (``SYNC_TASK``), so this module does not import tasks (which import syncing, which
imports this): no import loop.
"""

from __future__ import annotations

import datetime
import logging

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError

from nodes.models import Node, SyncRun, SyncState, SyncStatus

log = logging.getLogger(__name__)

SYNC_TASK = "nodes.tasks.sync_node"


@transaction.atomic
def request_sync(node: Node, *, reason: str, requested_by=None, kind: str = "sync") -> SyncRun:
    """Queue a sync of one node; the task is sent only after the surrounding transaction commits.

    A sync reads the plan when it runs, so one queued run carries any number of changes: a request that finds
    one waiting joins it (ten revocations in a row mean one more sync per node, not ten)."""
    # A sync already running compares this generation when it ends and goes again if it moved.
    Node.objects.filter(pk=node.pk).update(sync_generation=F("sync_generation") + 1)
    waiting = SyncRun.objects.select_for_update().filter(node=node, kind=kind, status=SyncStatus.QUEUED).first()
    if waiting is not None:
        waiting.reason = f"{waiting.reason}; {reason}"[:200]
        waiting.save(update_fields=["reason"])
        return waiting
    run = SyncRun.objects.create(node=node, kind=kind, reason=reason[:200], status=SyncStatus.QUEUED)
    transaction.on_commit(lambda: enqueue_sync(node.pk, run.pk))
    return run


def enqueue_sync(node_id: int, run_id: int) -> bool:
    """Send the sync task (after commit, like delay_on_commit). A broker that is down must not turn a saved
    change into an error page: the run stays queued and the periodic sweep (requeue_stale_runs) sends it later."""
    try:
        # The registered task's own options apply (acks_late, retries); the queue is the default one.
        current_app.signature(SYNC_TASK, args=(node_id, run_id)).delay()
    except OperationalError as exc:
        log.warning("could not queue sync run %s of node %s, the sweep will retry: %s", run_id, node_id, exc)
        return False
    return True


def requeue_stale_runs(*, older_than_s: int = 120) -> int:
    """Re-send queued runs of idle nodes that nobody picked up (the broker was down, a worker was lost)."""
    now = timezone.now()
    cutoff = now - datetime.timedelta(seconds=older_than_s)
    # A node still claimed long past the task time limit lost its worker; the claim will be taken over.
    stale = SyncRun.objects.filter(
        Q(node__sync_state=SyncState.IDLE) | Q(node__sync_claimed_at__lt=lost_before(now)),
        status=SyncStatus.QUEUED, kind="sync", created_at__lt=cutoff,
    ).order_by("node_id", "created_at")
    _reap_lost_claims(now)
    latest = {}
    for run in stale:
        latest.setdefault(run.node_id, run)  # one run per node carries every change
    return sum(enqueue_sync(node_id, run.pk) for node_id, run in latest.items())


def _reap_lost_claims(now) -> None:
    """Free nodes whose sync worker died (no periodic check would ever claim a node that is not ready)."""
    lost = Node.objects.filter(sync_state=SyncState.RUNNING, sync_claimed_at__lt=lost_before(now))
    SyncRun.objects.filter(node__in=lost, status=SyncStatus.RUNNING).update(
        status=SyncStatus.ERRORED, finished_at=now, error="the worker running this sync was lost")
    lost.update(sync_state=SyncState.IDLE)


def prune_runs(*, keep_days: int = 14) -> int:
    """Delete finished runs older than `keep_days`; drift checks add one per node every few minutes."""
    cutoff = timezone.now() - datetime.timedelta(days=keep_days)
    deleted, _ = SyncRun.objects.filter(created_at__lt=cutoff).exclude(
        status__in=[SyncStatus.QUEUED, SyncStatus.RUNNING]).delete()
    return deleted


# --- claims -----------------------------------------------------------------------------------------------------


def claim(node: Node):
    """Take the node for one sync. A claim older than the task's hard time limit belongs to a worker that died
    (killed, OOM, power loss) without releasing it: Celery has killed or forgotten that task, so it is taken over,
    and the run it left 'running' is closed as errored.

    Returns the claim's token (its timestamp), or None when someone else holds the node."""
    now = timezone.now()
    taken = Node.objects.filter(
        Q(sync_state=SyncState.IDLE) | Q(sync_state=SyncState.RUNNING, sync_claimed_at__lt=lost_before(now)),
        pk=node.pk,
    ).update(sync_state=SyncState.RUNNING, sync_claimed_at=now) == 1
    if not taken:
        return None
    SyncRun.objects.filter(node=node, status=SyncStatus.RUNNING).update(
        status=SyncStatus.ERRORED, finished_at=now, error="the worker running this sync was lost")
    return now


def lost_before(now):
    """Claims older than this were left by a worker that died: past the hard time limit no task still runs."""
    return now - datetime.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 60)


def release(node: Node, token) -> None:
    # Only our own claim: a worker that outlived its claim must not free the node under the one that took over.
    Node.objects.filter(pk=node.pk, sync_claimed_at=token).update(sync_state=SyncState.IDLE)


def queue_retry(run: SyncRun) -> SyncRun | None:
    """A fresh queued run for the task's retry; the failed one stays as the record of the attempt. None when a
    run is queued already: it was sent and carries the work (and its own retries), so no second chain starts."""
    if SyncRun.objects.filter(node=run.node, status=SyncStatus.QUEUED).exists():
        return None
    return SyncRun.objects.create(node=run.node, kind=run.kind, reason=f"retry: {run.reason}"[:200])


def continue_if_requested(node: Node, generation: int) -> None:
    """Requests made while a sync ran may postdate the plan it applied: run once more for them."""
    if Node.objects.filter(pk=node.pk, sync_generation__gt=generation).exists():
        pending = SyncRun.objects.filter(node=node, status=SyncStatus.QUEUED).order_by("created_at").first()
        if pending is not None:
            enqueue_sync(node.pk, pending.pk)
        else:  # the request joined the run that just finished, after it had read the plan
            request_sync(node, reason="changes made while the last sync ran")


# --- a run's record ---------------------------------------------------------------------------------------------


def start(run: SyncRun) -> None:
    run.status, run.started_at = SyncStatus.RUNNING, timezone.now()
    run.save(update_fields=["status", "started_at"])


def finish(run: SyncRun, status: str, *, error: str = "") -> None:
    run.status, run.error, run.finished_at = status, error, timezone.now()
    if status == SyncStatus.COMPLETED:
        run.progress, run.current_step = 100, "done"
    # An UPDATE of a run still running: a run a takeover closed stays closed, a deleted node's run stays gone,
    # and a reason appended meanwhile is kept.
    SyncRun.objects.filter(pk=run.pk, status=SyncStatus.RUNNING).update(
        status=status, error=error, finished_at=run.finished_at, progress=run.progress,
        current_step=run.current_step, log=run.log, changed_files=run.changed_files, restarted=run.restarted,
        retryable=run.retryable)


def skip(run: SyncRun, why: str) -> None:
    run.status, run.error, run.finished_at = SyncStatus.SKIPPED, why, timezone.now()
    SyncRun.objects.filter(pk=run.pk).update(status=run.status, error=why, finished_at=run.finished_at)
