"""Background runs against one node: sync (and its drift-repair variant) and the status poll.

Each run leaves a SyncRun row: running, then completed, failed (an expected ProvisioningError, message shown to
the host) or errored (anything else, traceback kept in the log). At most one sync runs per node: the node row is
claimed with a conditional UPDATE, so a redelivered or duplicate task finds it taken and leaves its run queued
for the running sync to pick up when it ends.
"""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from nodes import openvpn_mgmt as management
from nodes import provisioning, services
from nodes.files import desired_files, instances_to_restart, reconnect_for, wanted_instances
from nodes.models import Link, LinkState, Node, NodeState, SyncRun, SyncState, SyncStatus, VpnSession
from nodes.ssh import ProvisioningError, open_connection

log = logging.getLogger(__name__)

STEP_COUNT = len(provisioning.STEPS)


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
    return now - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 60)


def release(node: Node, token) -> None:
    # Only our own claim: a worker that outlived its claim must not free the node under the one that took over.
    Node.objects.filter(pk=node.pk, sync_claimed_at=token).update(sync_state=SyncState.IDLE)


def run_sync(node: Node, *, run_id: int | None = None, kind: str = "sync") -> SyncRun:
    """Claim the node, make it match the plan, record the outcome, and go again if a request came meanwhile."""
    if run_id is None:
        run = SyncRun.objects.create(node=node, kind=kind, reason=f"{kind} check")
    else:
        run = SyncRun.objects.filter(pk=run_id, node=node).first()
        if run is None:
            return SyncRun(node=node, kind=kind, status=SyncStatus.SKIPPED, error="no such run")  # stale task
    if run.status != SyncStatus.QUEUED:
        return run  # a duplicate delivery of a run that already happened
    token = claim(node)
    if token is None:
        if run_id is None:  # a periodic check: the sync that holds the node does the same work
            _skip(run, "another sync of this node was running")
        return run  # a requested sync stays queued; the running one picks it up when it ends
    generation = None
    try:  # from here on the claim is ours: whatever happens, it is released
        generation = Node.objects.values_list("sync_generation", flat=True).get(pk=node.pk)
        _start(run)
        _sync(Node.objects.select_related("lan").get(pk=node.pk), run)
        _finish(run, SyncStatus.COMPLETED)
    except ProvisioningError as exc:
        _fail_node(node, exc.message)
        run.retryable = not exc.permanent and exc.step == "connect"
        _finish(run, SyncStatus.FAILED, error=f"{exc.step}: {exc.message}")
    except Exception as exc:  # recorded, never shown as a traceback to the host
        log.exception("sync of %s errored", node.name)
        _fail_node(node, f"Internal error: {exc.__class__.__name__}: {exc}")
        run.log += traceback.format_exc()
        _finish(run, SyncStatus.ERRORED, error=f"{exc.__class__.__name__}: {exc}")
    finally:
        release(node, token)
        if generation is not None:
            _continue_if_requested(node, generation)
    return run


def queue_retry(run: SyncRun) -> SyncRun | None:
    """A fresh queued run for the task's retry; the failed one stays as the record of the attempt. None when a
    run is queued already: it was sent and carries the work (and its own retries), so no second chain starts."""
    if SyncRun.objects.filter(node=run.node, status=SyncStatus.QUEUED).exists():
        return None
    return SyncRun.objects.create(node=run.node, kind=run.kind, reason=f"retry: {run.reason}"[:200])


def _continue_if_requested(node: Node, generation: int) -> None:
    """Requests made while this sync ran may postdate the plan it applied: run once more for them."""
    if Node.objects.filter(pk=node.pk, sync_generation__gt=generation).exists():
        pending = SyncRun.objects.filter(node=node, status=SyncStatus.QUEUED).order_by("created_at").first()
        if pending is not None:
            services.enqueue_sync(node.pk, pending.pk)
        else:  # the request joined the run that just finished, after it had read the plan
            services.request_sync(node, reason="changes made while the last sync ran")


def _start(run: SyncRun) -> None:
    run.status, run.started_at = SyncStatus.RUNNING, timezone.now()
    run.save(update_fields=["status", "started_at"])


def _finish(run: SyncRun, status: str, *, error: str = "") -> None:
    run.status, run.error, run.finished_at = status, error, timezone.now()
    if status == SyncStatus.COMPLETED:
        run.progress, run.current_step = 100, "done"
    # An UPDATE of a run still running: a run a takeover closed stays closed, a deleted node's run stays gone,
    # and a reason appended meanwhile is kept.
    SyncRun.objects.filter(pk=run.pk, status=SyncStatus.RUNNING).update(
        status=status, error=error, finished_at=run.finished_at, progress=run.progress,
        current_step=run.current_step, log=run.log, changed_files=run.changed_files, restarted=run.restarted,
        retryable=run.retryable)


def _skip(run: SyncRun, why: str) -> None:
    run.status, run.error, run.finished_at = SyncStatus.SKIPPED, why, timezone.now()
    SyncRun.objects.filter(pk=run.pk).update(status=run.status, error=why, finished_at=run.finished_at)


def _fail_node(node: Node, message: str) -> None:
    # A node that never worked is "failed"; one that worked keeps running its previous files and stays ready.
    Node.objects.filter(pk=node.pk).update(last_error=message[:2000])
    Node.objects.filter(pk=node.pk, applied_files={}).update(state=NodeState.FAILED)


class StepRecorder:
    """Writes each step's name, duration and outcome onto the run as it ends, and names the next one, so the
    progress bar and the node page follow the run."""

    def __init__(self, run: SyncRun):
        self.run = run
        run.current_step = provisioning.STEPS[0]

    def __call__(self, step: str, seconds: float, changed: bool) -> None:
        run = self.run
        run.steps = [*run.steps, {"step": step, "seconds": round(seconds, 3), "changed": changed}]
        run.progress = min(99, int(100 * len(run.steps) / STEP_COUNT))
        run.log += f"{step}: {'changed' if changed else 'unchanged'} in {seconds:.2f}s\n"
        index = provisioning.STEPS.index(step) if step in provisioning.STEPS else -1
        run.current_step = provisioning.STEPS[index + 1] if 0 <= index < STEP_COUNT - 1 else step
        SyncRun.objects.filter(pk=run.pk).update(current_step=run.current_step, progress=run.progress,
                                                 steps=run.steps, log=run.log)


def _sync(node: Node, run: SyncRun) -> None:
    lan = node.lan
    lan_plan = services.plan_lan(lan)
    files = desired_files(lan, node, lan_plan)
    wanted = wanted_instances(files)
    links = provisioning.node_links(lan_plan.plan, node.name)
    revoked = services.revoked_names(lan)
    recorder = StepRecorder(run)
    with open_connection(node, pin=lambda key: services.accept_host_key(node, key_line=key)) as c:
        # Revoked players go first, before the slower steps: HALT stops their clients, and the new CRL uploaded
        # below refuses any that come back; the second pass after the upload catches one that raced it.
        halted = _halt_revoked(c, revoked)
        result = provisioning.apply(
            c, files=files, remove=set(node.applied_files) - set(files), wanted=wanted,
            restart=lambda changed: instances_to_restart(changed, files, wanted),
            links=[(link.device, link.peer) for link in links], log=recorder,
        )
        # Clients whose client-config-dir file changed reconnect to pick it up (OpenVPN reads it on connect),
        # and revoked certificates lose any session still open: the CRL only stops new handshakes.
        status = management.node_status(c)
        killed = halted + management.kill_clients(c, status, revoked, message="HALT")
        killed += management.kill_clients(c, status, reconnect_for(result.changed) - revoked, message="RESTART")
    notes = result.notes + result.verify.get("warnings", [])
    run.log += "".join(f"note: {n}\n" for n in notes) + (f"disconnected {killed} client(s)\n" if killed else "")
    _store_link_states(node, links, result.verify.get("links", {}))
    run.changed_files = sorted(result.changed)
    run.restarted = sorted(set(result.restarted) | set(result.instances.started)
                           | ({"lanhub-relay"} if result.relay.started or result.relay.restarted else set()))
    Node.objects.filter(pk=node.pk).update(
        applied_files={path: f.sha256 for path, f in files.items()}, state=NodeState.READY, last_error="",
        openvpn_version=result.openvpn_version[:64], last_seen_at=timezone.now(), missed_polls=0,
    )


def _halt_revoked(c, revoked: set[str]) -> int:
    """Disconnect revoked clients on the instances already running; a node being set up has none yet."""
    if not revoked:
        return 0
    try:
        return management.kill_clients(c, management.node_status(c), revoked, message="HALT")
    except ProvisioningError:
        return 0  # no instance answers yet (first sync, or one is down): the pass after the upload handles it


def _store_link_states(node: Node, links, rtts: dict) -> None:
    """What verify measured on each of this node's links (None: no answer yet)."""
    now = timezone.now()
    for link in links:
        if link.device in rtts:
            rtt = rtts[link.device]
            Link.objects.filter(downstream=node, upstream__name=link.upstream).update(
                state=LinkState.UP if rtt is not None else LinkState.DOWN, rtt_ms=rtt, updated_at=now)


# --- Status ---------------------------------------------------------------------------------------------------


def poll_status(node: Node) -> str:
    """Read who is online and how the links are, from each instance's management interface over SSH."""
    node = Node.objects.select_related("lan").get(pk=node.pk)
    try:
        with open_connection(node) as c:
            status = management.node_status(c, links=provisioning.node_links(services.plan_lan(node.lan).plan,
                                                                             node.name))
            revoked = services.revoked_names(node.lan)
            killed = management.kill_clients(c, status, revoked, message="HALT")
    except ProvisioningError as exc:
        return _missed_poll(node, exc.message)
    _store_status(node, status)
    return f"ok: {len(status.clients) - killed} online"


def _missed_poll(node: Node, message: str) -> str:
    Node.objects.filter(pk=node.pk).update(missed_polls=F("missed_polls") + 1, last_error=message[:2000])
    node.refresh_from_db()
    if node.healthy and node.missed_polls >= settings.LANHUB_DOWN_AFTER_POLLS:
        mark_health(node, healthy=False, reason=f"{node.name} missed {node.missed_polls} polls: {message}")
        return "down"
    return "missed"


@transaction.atomic
def mark_health(node: Node, *, healthy: bool, reason: str) -> None:
    """Mark a node up or down and re-plan the LAN so its region fails over (or comes back)."""
    Node.objects.filter(pk=node.pk).update(healthy=healthy)
    services.replan(node.lan, reason=reason)


@transaction.atomic
def _store_status(node: Node, status) -> None:
    from players.models import Player

    now = timezone.now()
    players = {p.common_name: p for p in Player.objects.filter(lan=node.lan, revoked_at__isnull=True)}
    VpnSession.objects.filter(node=node).delete()
    VpnSession.objects.bulk_create(
        VpnSession(node=node, instance=row.instance, common_name=row.common_name,
                   player=players.get(row.common_name), vpn_address=row.vpn_address or None,
                   real_address=row.real_address, connected_since=row.connected_since,
                   bytes_in=row.bytes_in, bytes_out=row.bytes_out, seen_at=now)
        for row in status.clients
    )
    seen = [players[r.common_name].pk for r in status.clients if r.common_name in players]
    Player.objects.filter(pk__in=seen).update(last_seen_at=now)
    for upstream, (state, rtt) in status.links.items():
        Link.objects.filter(downstream=node, upstream__name=upstream).update(
            state=LinkState.UP if state else LinkState.DOWN, rtt_ms=rtt, updated_at=now)
    was_down = not node.healthy
    Node.objects.filter(pk=node.pk).update(missed_polls=0, last_seen_at=now)
    if was_down:
        mark_health(node, healthy=True, reason=f"{node.name} answers again")
