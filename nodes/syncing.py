"""Background runs against one node: sync (and its drift-repair variant) and the status poll.

Each run leaves a SyncRun row: running, then completed, failed (an expected ProvisioningError, message shown to
the host) or errored (anything else, traceback kept in the log). Claims, requests and the run record are
nodes/runs.py's; the plan a sync applies is nodes/planning.py's. This module never imports services or tasks.
"""

from __future__ import annotations

import logging
import traceback

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from nodes import openvpn_mgmt as management
from nodes import planning, presence, provisioning
from nodes.files import desired_files, instances_to_restart, reconnect_for, wanted_instances
from nodes.models import Link, LinkState, Node, NodeState, SyncRun, SyncStatus
from nodes.runs import claim, continue_if_requested, finish, queue_retry, release, skip, start  # noqa: F401
from nodes.ssh import ProvisioningError, open_connection

log = logging.getLogger(__name__)

STEP_COUNT = len(provisioning.STEPS)


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
            skip(run, "another sync of this node was running")
        return run  # a requested sync stays queued; the running one picks it up when it ends
    generation = None
    try:  # from here on the claim is ours: whatever happens, it is released
        generation = Node.objects.values_list("sync_generation", flat=True).get(pk=node.pk)
        start(run)
        _sync(Node.objects.select_related("lan").get(pk=node.pk), run)
        finish(run, SyncStatus.COMPLETED)
    except ProvisioningError as exc:
        _fail_node(node, exc.message)
        run.retryable = not exc.permanent and exc.step == "connect"
        finish(run, SyncStatus.FAILED, error=f"{exc.step}: {exc.message}")
    except Exception as exc:  # recorded, never shown as a traceback to the host
        log.exception("sync of %s errored", node.name)
        _fail_node(node, f"Internal error: {exc.__class__.__name__}: {exc}")
        run.log += traceback.format_exc()
        finish(run, SyncStatus.ERRORED, error=f"{exc.__class__.__name__}: {exc}")
    finally:
        release(node, token)
        if generation is not None:
            continue_if_requested(node, generation)
    return run


@transaction.atomic
def accept_host_key(node: Node, *, key_line: str) -> Node:
    """Pin the SSH host key seen on first contact (or one an operator accepted after a change)."""
    Node.objects.filter(pk=node.pk, ssh_host_key="").update(ssh_host_key=key_line.strip())
    node.refresh_from_db(fields=["ssh_host_key"])
    return node


@transaction.atomic
def _fail_node(node: Node, message: str) -> None:
    # A node that never worked is "failed"; one that worked keeps running its previous files and stays ready.
    planning.lock_lan(node.lan_id)
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
    lan_plan = planning.current_plan(lan)
    files = desired_files(lan, node, lan_plan)
    wanted = wanted_instances(files)
    links = provisioning.node_links(lan_plan.plan, node.name)
    revoked = planning.revoked_names(lan)
    recorder = StepRecorder(run)
    with open_connection(node, pin=lambda key: accept_host_key(node, key_line=key)) as c:
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
    with transaction.atomic():
        planning.lock_lan(node.lan_id)
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
            status = management.node_status(c, links=planning.node_links(node))
            revoked = planning.revoked_names(node.lan)
            killed = management.kill_clients(c, status, revoked, message="HALT")
    except ProvisioningError as exc:
        return _missed_poll(node, exc.message)
    _store_status(node, status)
    return f"ok: {len(status.clients) - killed} online"


def _missed_poll(node: Node, message: str) -> str:
    """Count a poll that could not reach the node. A healthy node is looked at again in LANHUB_RECHECK_AFTER
    seconds, not at the next round (a held node's next round can be half an hour away), until it answers or has
    missed LANHUB_DOWN_AFTER_POLLS in a row and is failed over."""
    Node.objects.filter(pk=node.pk).update(missed_polls=F("missed_polls") + 1, last_error=message[:2000])
    node.refresh_from_db()
    if not node.healthy:
        return "missed"
    if node.missed_polls >= settings.LANHUB_DOWN_AFTER_POLLS:
        mark_health(node, healthy=False, reason=f"{node.name} missed {node.missed_polls} polls: {message}")
        return "down"
    presence.request_poll(node.pk, countdown=settings.LANHUB_RECHECK_AFTER, reason="missed a poll")
    return "missed"


@transaction.atomic
def mark_health(node: Node, *, healthy: bool, reason: str) -> None:
    """Mark a node up or down and re-plan the LAN so its region fails over (or comes back). A node marked down
    takes its sessions with it: its players are not online there any more (their clients move to a fallback
    server, where they show again), and the watcher or the poll reads the list afresh once it answers."""
    planning.lock_lan(node.lan_id)
    Node.objects.filter(pk=node.pk).update(healthy=healthy)
    if not healthy:
        presence.replace_node(node, [])
    planning.replan(node.lan, reason=reason)


@transaction.atomic
def _store_status(node: Node, status) -> None:
    now = timezone.now()
    presence.replace_node(node, status.clients)
    for upstream, (state, rtt) in status.links.items():
        Link.objects.filter(downstream=node, upstream__name=upstream).update(
            state=LinkState.UP if state else LinkState.DOWN, rtt_ms=rtt, updated_at=now)
    was_down = not node.healthy
    Node.objects.filter(pk=node.pk).update(missed_polls=0, last_seen_at=now)
    if was_down:
        mark_health(node, healthy=True, reason=f"{node.name} answers again")
    elif status.links:
        _replan_if_rtts_moved(node)


def _replan_if_rtts_moved(node: Node) -> None:
    """Re-plan when this node's links measured RTTs far from the ones the stored plan used (RTT_REPLAN_*)."""
    if not planning.rtts_moved(node.lan):
        return
    try:
        with transaction.atomic():
            planning.replan(node.lan, reason=f"link RTTs of {node.name} changed")
    except ValidationError as exc:
        log.error("LAN %s could not be re-planned after RTTs changed: %s", node.lan_id, "; ".join(exc.messages))
