"""Host pages: LANs, the LAN dashboard, nodes and their sync status.

Each view authorizes through lanhub.access, validates with a form, calls one service and renders or redirects.
Reading helpers (`_dashboard`, `_status`) only read, with a fixed number of queries the tests pin down.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Prefetch, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from lanhub.access import get_lan_for_host, get_node_for_host
from nodes import services, svg
from nodes.forms import GameListForm, LanForm, NodeForm, add_service_error
from nodes.models import NODE_BULK_FIELDS, Lan, Link, LinkState, Node, SyncRun, SyncState, SyncStatus, VpnSession
from players.forms import InviteForm
from players.models import Player

ACTIVE_RUN = (SyncStatus.QUEUED, SyncStatus.RUNNING)
PLAYERS_PER_PAGE = 50  # the dashboard's players table; ?players=<page> for the rest
SERVERS_PER_PAGE = 24  # the dashboard's server cards; ?servers=<page> for the rest (the topology shows them all)
CARD_DEFERRED = tuple(f for f in NODE_BULK_FIELDS if f != "last_error")  # a card shows the last error
INVITES_SHOWN = 20  # the newest invites; older ones are used up or expired in practice


# --- LANs -------------------------------------------------------------------------------------------------------


@require_GET
@login_required
def lan_list(request):
    return _render_lan_list(request, LanForm())


@require_POST
@login_required
def lan_create(request):
    form = LanForm(request.POST)
    if form.is_valid():
        try:
            lan = services.create_lan(owner=request.user, **form.cleaned_data)
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            return redirect("nodes:lan_detail", slug=lan.slug)
    return _render_lan_list(request, form)


def _render_lan_list(request, form, status=200):
    # Queries: the LANs of this host, with node and player counts as correlated subqueries in the same query. (Two
    # COUNT(DISTINCT) over one join would first build every node x player pair: 100,000 rows for 100 and 1,000.)
    lans = Lan.objects.filter(owner=request.user).annotate(
        node_total=_count(Node.objects.filter(lan=OuterRef("pk"))),
        player_total=_count(Player.objects.filter(lan=OuterRef("pk"))),
    )
    return render(request, "nodes/lan_list.html", {"lans": lans, "form": form}, status=status)


def _count(query, *, by: str = "lan") -> Coalesce:
    """COUNT(*) of `query` (filtered on an OuterRef) as a correlated subquery, grouped on its `by` column."""
    return Coalesce(Subquery(query.order_by().values(by).annotate(n=Count("pk")).values("n")), 0)


@require_GET
@login_required
def lan_detail(request, slug):
    lan = get_lan_for_host(request, slug)
    return render(request, "nodes/lan_detail.html", _dashboard(request, lan))


@require_POST
@login_required
def node_add(request, slug):
    lan = get_lan_for_host(request, slug)
    form = NodeForm(request.POST, lan=lan)
    if form.is_valid():
        try:
            node = services.create_node(lan=lan, requested_by=request.user, **form.service_fields())
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            return redirect("nodes:node_detail", pk=node.pk)
    return render(request, "nodes/lan_detail.html", _dashboard(request, lan, node_form=form))


@require_POST
@login_required
def lan_games(request, slug):
    lan = get_lan_for_host(request, slug)
    form = GameListForm(request.POST, instance=Lan(pk=lan.pk, owner_id=lan.owner_id))
    if form.is_valid():
        try:
            services.update_discovery(lan, requested_by=request.user, **form.cleaned_data)
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            return redirect(reverse("nodes:lan_detail", kwargs={"slug": lan.slug}) + "#games")
    return render(request, "nodes/lan_detail.html", _dashboard(request, lan, games_form=form), status=400)


@require_GET
@login_required
def lan_topology_svg(request, slug):
    lan = get_lan_for_host(request, slug)
    nodes = list(lan.nodes.order_by("created_at", "pk"))
    links = list(Link.objects.filter(lan=lan).select_related("upstream", "downstream"))
    body = svg.render_topology(nodes, links, title=f"{lan.name}: servers by region and the links between them")
    response = HttpResponse(body, content_type="image/svg+xml; charset=utf-8")
    response["Cache-Control"] = "no-store"  # the picture changes as links go up and down
    return response


def _pk_url(name: str):
    """A function giving the URL ``name`` for any primary key, from one reverse(): a page of rows would otherwise
    pay a reverse() (URL resolver, converters, quoting) for every link and button of every row."""
    sentinel = 7_316_509_284_613
    head, tail = reverse(name, args=[sentinel]).split(str(sentinel))
    return lambda pk: f"{head}{int(pk)}{tail}"


_BLANK_NODE_FORMS: dict[tuple, str] = {}  # the blank add-server form's fields by its upstream choices
_BLANK_NODE_FORMS_KEPT = 256


def node_form_fields(form: NodeForm) -> str:
    """The add-server form's fields as HTML. A blank form differs between LANs and loads only by its upstream
    choices (the LAN's nodes), so its HTML is kept per choice list: drawing its inputs through Django's widget
    templates is a tenth of a dashboard load. A bound form (errors, the values typed) is drawn each time."""
    if form.is_bound:
        return render_to_string("nodes/_node_form_fields.html", {"node_form": form})
    key = tuple((str(value), str(label)) for value, label in form.fields["pinned_upstream"].widget.choices)
    html = _BLANK_NODE_FORMS.get(key)
    if html is None:
        html = render_to_string("nodes/_node_form_fields.html", {"node_form": form})
        if len(_BLANK_NODE_FORMS) >= _BLANK_NODE_FORMS_KEPT:
            _BLANK_NODE_FORMS.clear()
        _BLANK_NODE_FORMS[key] = html
    return html


def _dashboard(request, lan: Lan, *, node_form=None, invite_form=None, games_form=None) -> dict:
    """Everything the LAN dashboard shows, in a fixed number of queries (see tests/nodes/test_views.py).

    Each query is bounded by what the page shows, never by the LAN's history or size: the latest run of a node is
    one index seek on (node, -created_at) per node, players come a page at a time with only their own sessions,
    invites are the newest few, and their QR codes are images the browser fetches on demand (players:invite_qr).
    """
    nodes = Paginator(lan.nodes.order_by("created_at", "pk").defer(*CARD_DEFERRED).annotate(
        # Players only: a downstream node's link client is a session on its upstream's server, not a player.
        online=_count(VpnSession.objects.filter(node=OuterRef("pk"), player__isnull=False), by="node"),
        latest_run_id=Subquery(SyncRun.objects.filter(node=OuterRef("pk")).order_by("-created_at", "-pk")
                               .values("pk")[:1]),
    ), SERVERS_PER_PAGE).get_page(request.GET.get("servers"))
    runs = SyncRun.objects.only("node_id", "status", "current_step", "progress", "created_at").in_bulk(
        [node.latest_run_id for node in nodes if node.latest_run_id])
    detail_url = _pk_url("nodes:node_detail")
    for node in nodes:
        node.run = runs.get(node.latest_run_id)
        node.detail_url = detail_url(node.pk)
    # The links table is read-only text: plain rows, not two Node objects per link.
    links = list(Link.objects.filter(lan=lan).order_by("pk").values(
        "address", "state", "rtt_ms", "upstream__display_name", "downstream__display_name"))
    for link in links:
        link["state_label"] = LinkState(link["state"]).label
    players = Paginator(lan.players.prefetch_related(
        Prefetch("sessions", queryset=VpnSession.objects.select_related("node").only("player_id", "vpn_address",
                                                                                      "node__display_name"),
                 to_attr="session_list")),
        PLAYERS_PER_PAGE).get_page(request.GET.get("players"))
    reissue_url, revoke_url = _pk_url("players:player_reissue"), _pk_url("players:player_revoke")
    for player in players:
        player.session = player.session_list[0] if player.session_list else None
        player.reissue_url, player.revoke_url = reissue_url(player.pk), revoke_url(player.pk)
    invites = list(lan.invites.all()[:INVITES_SHOWN + 1])
    withdraw_url, qr_url = _pk_url("players:invite_revoke"), _pk_url("players:invite_qr")
    for invite in invites:
        invite.url = request.build_absolute_uri(reverse("players:join", args=[invite.token]))
        invite.revoke_url, invite.qr_url = withdraw_url(invite.pk), qr_url(invite.pk)
    return {
        "lan": lan, "nodes": nodes, "players": players, "invites": invites[:INVITES_SHOWN],
        "more_invites": len(invites) > INVITES_SHOWN,
        "links": links,
        # Every server's, not this page's: each player once, however many devices they have online.
        "online_total": VpnSession.objects.filter(node__lan=lan, player__isnull=False)
                        .values("player_id").distinct().count(),
        # How many servers the address plan holds (docs/addressing.md): computed from the settings, no query.
        "capacity": services.lan_capacity(lan),
        "player_routes": services.player_routes(lan),  # the stored plan's blocks and pools: one query
        "node_form_fields": node_form_fields(node_form or NodeForm(lan=lan)),
        "invite_form": invite_form or InviteForm(),
        "games_form": games_form or GameListForm(instance=lan),
    }


# --- Nodes ------------------------------------------------------------------------------------------------------


@require_GET
@login_required
def node_detail(request, pk):
    node = get_node_for_host(request, pk)
    runs = list(node.sync_runs.all()[:10])
    sessions = list(node.sessions.select_related("player"))
    return render(request, "nodes/node_detail.html",
                  {"node": node, "lan": node.lan, "runs": runs, "run": runs[0] if runs else None,
                   "sessions": sessions,
                   # Players, not sessions: one player's PC and laptop are two sessions.
                   "players_online": len({s.player_id for s in sessions if s.player_id})})


@require_POST
@login_required
def node_sync(request, pk):
    node = get_node_for_host(request, pk)
    services.request_sync(node, reason="sync requested by the host", requested_by=request.user)
    return redirect("nodes:node_detail", pk=node.pk)


@require_GET
def node_status(request, pk):
    """JSON for the progress bars on the dashboard, the node page and the admin (static/js/sync-progress.js)."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "Sign in first."}, status=401)
    node = get_node_for_host(request, pk, operators=True)
    runs = list(node.sync_runs.all()[:5])
    return JsonResponse(_status(node, runs), headers={"Cache-Control": "no-store"})


def _status(node: Node, runs: list[SyncRun]) -> dict:
    run = runs[0] if runs else None
    active = node.sync_state == SyncState.RUNNING or (run is not None and run.status in ACTIVE_RUN)
    return {
        "node": node.name,
        "state": node.state,
        "state_label": node.get_state_display(),
        "healthy": node.healthy,
        "sync_state": node.sync_state,
        "active": active,
        "status": run.status if run else None,
        "status_label": run.get_status_display() if run else "No sync yet",
        "current_step": (run.current_step if run else "") or "",
        "progress": run.progress if run else 0,
        "last_error": node.last_error or (run.error if run else ""),
        "openvpn_version": node.openvpn_version,
        "runs": [
            {"kind": r.kind, "status": r.status, "status_label": r.get_status_display(), "reason": r.reason,
             "current_step": r.current_step, "progress": r.progress, "error": r.error,
             "created_at": r.created_at.isoformat(), "finished_at": r.finished_at and r.finished_at.isoformat()}
            for r in runs
        ],
    }
