"""Invites and players: the host's buttons, the friend's join page, the player's own page and the lobby.

Public pages are reached by token only (lanhub.access.get_*_by_token). A token that cannot be ours, or names
nothing, gets a 404 page; an invite that is expired, used up or revoked, and a revoked player, get a 410 page that
says which. Every page here is a thin view: authorize, validate, call one service, render or redirect.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import OuterRef, Subquery
from django.http import Http404, HttpResponse, HttpResponseNotModified, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from lanhub.access import (LinkNotFound, find_device_for_download, get_invite_by_token, get_invite_for_host,
                           get_lan_for_host, get_lan_node, get_player_by_token, get_player_device,
                           get_player_for_host)
from lanhub.clientip import client_address
from lanhub.middleware import CSP
from nodes.forms import add_service_error
from nodes.models import Lan, VpnSession
from nodes.svg import qr_svg, qr_svg_document
from nodes.views import _dashboard
from players import lobby as live
from players import ranking, services
from players.forms import ChooseNodeForm, DeviceForm, InviteForm, JoinForm, RttForm
from players.models import Device, Player

RTT_SESSION_KEY = "lanhub.rtt.{}"  # per player: {node pk: ms or None}, as the player's browser measured

# Wording of the pages a public link can end on: (status, title, explanation).
LINK_PROBLEMS = {
    "malformed": (404, "This link is incomplete",
                  "Part of the link seems to be missing or mistyped. Copy the whole link again from the message "
                  "you were sent."),
    "unknown": (404, "This link leads nowhere",
                "There is no invite or player page at this address. Ask the host for a new link."),
    "expired": (410, "This invite has expired",
                "Invites work for a limited time, and this one's time is up. Ask the host for a fresh link."),
    "used_up": (410, "This invite has been used up",
                "As many people as the host allowed have already joined with this link. Ask the host for another."),
    "revoked": (410, "This invite was withdrawn",
                "The host switched this link off. If you should still join, ask them for a new one."),
    "not_found": (404, "This link leads nowhere",
                  "There is no invite at this address. Ask the host for a new link."),
    "player_revoked": (410, "This player was removed",
                       "The host removed this player from the LAN, so its profiles no longer connect. Ask the host "
                       "for a new invite if that was a mistake."),
}


def _link_problem(request, reason: str, lan: Lan | None = None) -> HttpResponse:
    status, title, text = LINK_PROBLEMS[reason]
    return render(request, "players/link_problem.html",
                  {"title": title, "text": text, "reason": reason, "lan": lan}, status=status)


def _rate_limited(request, exc, lan: Lan) -> HttpResponse:
    response = render(request, "players/rate_limited.html", {"message": str(exc), "lan": lan}, status=429)
    response["Retry-After"] = str(exc.retry_after)
    return response


def public_link(view):
    """Turn LinkNotFound (a malformed or unknown token) into its own explanatory 404 page."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except LinkNotFound as exc:
            return _link_problem(request, exc.reason)

    return wrapper


def active_player(view):
    """Resolve /me/<token>/ to its player; a revoked player gets the 410 page (and never a profile)."""

    @public_link
    @wraps(view)
    def wrapper(request, token, *args, **kwargs):
        player = get_player_by_token(token)
        if player.revoked_at:
            return _link_problem(request, "player_revoked", lan=player.lan)
        return view(request, player, *args, **kwargs)

    return wrapper


# --- Host: invites and players ----------------------------------------------------------------------------------


@require_POST
@login_required
def invite_create(request, slug):
    lan = get_lan_for_host(request, slug)
    form = InviteForm(request.POST)
    if form.is_valid():
        try:
            services.create_invite(lan=lan, created_by=request.user, note=form.cleaned_data["note"],
                                   ttl=form.ttl(), max_uses=form.cleaned_data["max_uses"])
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            messages.success(request, "Invite created: copy the link or show the QR code to your friends.")
            return redirect(reverse("nodes:lan_detail", args=[lan.slug]) + "#invites")
    return render(request, "nodes/lan_detail.html", _dashboard(request, lan, invite_form=form))


@require_POST
@login_required
def invite_revoke(request, pk):
    invite = get_invite_for_host(request, pk)
    services.revoke_invite(invite)
    messages.success(request, "Invite withdrawn: its link no longer works.")
    return redirect(reverse("nodes:lan_detail", args=[invite.lan.slug]) + "#invites")


@require_GET
@login_required
def invite_qr(request, pk):
    """The invite link as a QR code, drawn when a browser asks for it rather than for every invite on every
    dashboard load. The token never changes, so the browser may keep the picture."""
    invite = get_invite_for_host(request, pk)
    url = request.build_absolute_uri(reverse("players:join", args=[invite.token]))
    response = HttpResponse(qr_svg_document(url), content_type="image/svg+xml")
    response["Cache-Control"] = "private, max-age=86400"  # it encodes a secret link: never in a shared cache
    return response


@require_POST
@login_required
def player_revoke(request, pk):
    player = get_player_for_host(request, pk)
    player = services.revoke_player(player)
    unreached = getattr(player, "unreached_nodes", [])
    if unreached:
        messages.warning(request, f"{player.nickname} is revoked. {', '.join(unreached)} could not be reached: "
                                  "it refuses them as soon as it answers again.")
    else:
        messages.success(request, f"{player.nickname} is revoked: every server refuses all their devices from now "
                                  "on.")
    return redirect(reverse("nodes:lan_detail", args=[player.lan.slug]) + "#players")


@require_POST
@login_required
def player_reissue(request, pk):
    player = get_player_for_host(request, pk)
    try:
        services.reissue_player(player)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"{player.nickname} has new certificates; the profiles they downloaded before stop "
                                  "working.")
    return redirect(reverse("nodes:lan_detail", args=[player.lan.slug]) + "#players")


@require_GET
@login_required
def host_lobby(request, slug):
    lan = get_lan_for_host(request, slug)
    fragment = reverse("players:host_lobby_fragment", args=[lan.slug])
    stream = reverse("players:host_lobby_stream", args=[lan.slug])
    return render(request, "players/lobby.html",
                  _lobby(lan, fragment_url=fragment, stream_url=stream, back=None, me=None))


@require_GET
@login_required
def host_lobby_fragment(request, slug):
    lan = get_lan_for_host(request, slug)
    return _lobby_fragment(request, lan, me=None)


@require_GET
@login_required
def host_lobby_stream(request, slug):
    lan = get_lan_for_host(request, slug)
    session_key = request.session.session_key

    def still_signed_in() -> bool:  # signing out deletes the session row
        return request.session.__class__().exists(session_key)

    return _lobby_stream(request, lan, allowed=still_signed_in)


# --- Friends: joining -------------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@public_link
def join(request, token):
    invite = get_invite_by_token(token)
    problem = invite.problem()
    if problem:
        return _link_problem(request, problem, lan=invite.lan)
    form = JoinForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            player = services.redeem_invite(token=invite.token, nickname=form.cleaned_data["nickname"],
                                            client_address=client_address(request),
                                            join_rate=settings.LANHUB_JOIN_RATE)
        except services.RateLimited as exc:
            return _rate_limited(request, exc, lan=invite.lan)
        except services.InviteUnusable as exc:  # used up or revoked while the friend was typing
            return _link_problem(request, exc.reason, lan=invite.lan)
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            return redirect("players:player_home", token=player.token)
    return render(request, "players/join.html", {"invite": invite, "lan": invite.lan, "form": form})


# --- The player's own page --------------------------------------------------------------------------------------


@require_GET
@active_player
def player_home(request, player):
    context = _player_context(request, player)
    response = render(request, "players/player.html", context)
    response["Content-Security-Policy"] = _probe_csp(context["ranked"])
    return response


@require_POST
@active_player
def player_rtt(request, player):
    """The browser posts the times it measured; they are kept in the session and the ranking is re-rendered."""
    nodes = services.ready_nodes(player.lan)
    form = RttForm(request.POST, node_ids=[n.pk for n in nodes])
    if not form.is_valid():
        return HttpResponse(" ".join(form.errors.get("rtts", ["Bad request."])), status=400,
                            content_type="text/plain; charset=utf-8")
    request.session[RTT_SESSION_KEY.format(player.pk)] = {str(k): v for k, v in form.cleaned_data["rtts"].items()}
    # Every part of the page that names the chosen server, not the ranking alone: the measured ranking may choose
    # another server, and the header, the download button, the QR code and the instructions must follow it.
    return render(request, "players/_chosen_parts.html", _player_context(request, player, nodes=nodes))


@require_POST
@active_player
def player_choose(request, player):
    form = ChooseNodeForm(request.POST, nodes=services.ready_nodes(player.lan))
    if form.is_valid():
        try:
            services.choose_node(player, form.chosen())
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"Your profile now starts with {form.chosen().display_name}. Download it "
                                      "again.")
    else:
        messages.error(request, "That server is not available; pick one from the list.")
    return redirect(reverse("players:player_home", args=[player.token]) + "#download")


@require_POST
@active_player
def player_add_device(request, player):
    form = DeviceForm(request.POST)
    if form.is_valid():
        try:
            device = services.add_device(player, name=form.cleaned_data["name"])
        except ValidationError as exc:
            add_service_error(form, exc)
        else:
            messages.success(request, f"“{device.name}” is added: download its profile on that device.")
            return redirect(reverse("players:player_home", args=[player.token]) + f"#device-{device.ref}")
    context = _player_context(request, player, device_form=form)
    response = render(request, "players/player.html", context, status=400)
    response["Content-Security-Policy"] = _probe_csp(context["ranked"])
    return response


@require_POST
@active_player
def player_lost_device(request, player, ref):
    device = get_player_device(player, ref)
    try:
        device = services.lose_device(player, device, limit=settings.LANHUB_LOST_DEVICE_RATE)
    except services.RateLimited as exc:
        return _rate_limited(request, exc, lan=player.lan)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("players:player_home", token=player.token)
    messages.success(request, f"Done: “{device.name}” is switched off on every server; your other devices stay "
                              "connected. This page has a new address: bookmark it.")
    return redirect("players:player_home", token=device.player.token)


@require_GET
def profile_download(request, token, node_ref, ref=None):
    """A device's profile for one server; without a device ref (links from before devices), the first device
    still in use. Most downloads are answered by players/middleware.py before the session and sign-in middleware,
    through download_response; this view serves the rest (a browser with a session) and explains refusals."""
    response = download_response(request, token, node_ref, ref)
    return response if response is not None else _profile_refused(request, token, node_ref, ref)


def download_response(request, token: str, node_ref: str, ref: str | None) -> HttpResponse | None:
    """The download itself, or None when there is nothing to download (the caller explains why). One query for the
    player, device and LAN, one for the ready nodes unless the LAN's nodes_version says the process has them (a
    session is read only if the browser measured round-trip times), and the rendered profile from the process's
    cache when nothing it is made of has changed (services.build_profile). Raises Http404 for a server that is not
    a ready node of the player's LAN."""
    found = find_device_for_download(token, ref)
    if found is None:
        return None
    player, device = found
    nodes = services.rank_ready_nodes(services.ready_node_rows(player.lan_id, version=player.lan.nodes_version),
                                      rtts=tuple(sorted(_measured(request, player).items())),
                                      client_country=ranking.country_of(client_address(request)),
                                      default_node_id=player.lan.default_node_id)
    node = get_lan_node(player.lan, node_ref, among=nodes)  # only a ready node of the player's LAN
    profile = services.build_profile(player, device=device, node=node, ranked=nodes)
    response = HttpResponse(profile.content, content_type="application/x-openvpn-profile")
    response["Content-Disposition"] = f'attachment; filename="{profile.filename}"'
    response["Cache-Control"] = "no-store"  # it holds the device's private key
    # Set here, not only by CommonMiddleware, which the short cut skips: without it the server sends the body
    # chunked, one more write and one more read per download.
    response["Content-Length"] = str(len(response.content))
    return response


@active_player
def _profile_refused(request, player, node_ref, ref):
    """Why there is no download: the page for a malformed or unknown link, a revoked player (410), or a 404 for a
    device switched off or not the player's. The lookups are the ones every other /me/ page makes."""
    get_player_device(player, ref)
    raise Http404("No such device, or it was switched off.")  # it was switched off a moment ago


@require_GET
@active_player
def lobby(request, player):
    fragment = reverse("players:lobby_fragment", args=[player.token])
    stream = reverse("players:lobby_stream", args=[player.token])
    back = reverse("players:player_home", args=[player.token])
    return render(request, "players/lobby.html",
                  _lobby(player.lan, fragment_url=fragment, stream_url=stream, back=back, me=player))


@require_GET
@active_player
def lobby_fragment(request, player):
    return _lobby_fragment(request, player.lan, me=player)


@require_GET
@active_player
def lobby_stream(request, player):
    still_playing = Player.objects.filter(pk=player.pk, revoked_at__isnull=True).exists
    return _lobby_stream(request, player.lan, allowed=still_playing)


# --- Reading helpers --------------------------------------------------------------------------------------------


def _ranking(request, player: Player, nodes=None) -> list[ranking.Ranked]:
    nodes = services.ready_nodes(player.lan) if nodes is None else nodes
    return ranking.rank_nodes(
        nodes, rtts=_measured(request, player),
        client_country=ranking.country_of(client_address(request)), countries=ranking.CountryTable.load(),
        default_node_id=player.lan.default_node_id,
    )


def _measured(request, player: Player) -> dict[int, float | None]:
    """The round-trip times the player's browser measured, per node pk (kept in the session by player_rtt)."""
    session = getattr(request, "session", None)  # none on the download's short cut (players/middleware.py)
    if session is None or (session.session_key is None and not session.modified):
        return {}  # no session yet: this browser measured nothing, and no session row needs reading
    stored = session.get(RTT_SESSION_KEY.format(player.pk)) or {}
    return {int(k): v for k, v in stored.items()}


def _player_context(request, player: Player, nodes=None, device_form=None) -> dict:
    ranked = _ranking(request, player, nodes)
    ready = [node for node, _ in ranked]
    chosen = next((n for n in ready if n.pk == player.preferred_node_id), ready[0] if ready else None)
    devices = services.active_devices(player)
    for device in devices:
        device.download_url = _device_download_url(player, device, chosen)
    download_url = devices[0].download_url if devices else None
    measured = RTT_SESSION_KEY.format(player.pk) in request.session
    return {
        "player": player, "lan": player.lan, "ranked": ranked, "chosen": chosen, "download_url": download_url,
        "profile_filename": (services.profile_filename(player, node=chosen, device=devices[0])
                             if chosen and devices else ""),
        "download_qr": qr_svg(request.build_absolute_uri(download_url)) if download_url else "",
        "measured": measured, "devices": devices, "device_form": device_form or DeviceForm(),
        "max_devices": services.MAX_DEVICES,
        "choose_form": ChooseNodeForm(nodes=ready, initial={"node": chosen.pk} if chosen else None),
    }


def _device_download_url(player: Player, device: Device, chosen) -> str | None:
    if chosen is None:
        return None
    return reverse("players:device_profile_download", args=[player.token, device.ref, chosen.name])


def _probe_csp(ranked) -> str:
    """The page's CSP, widened so its script may time a request to each node (and to nothing else)."""
    origins = []
    for node, _ in ranked:
        host = node.public_address
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal needs brackets in an origin
        origins += [f"http://{host}:{node.tcp_port}", f"https://{host}:{node.tcp_port}"]
    return CSP.replace("connect-src 'self'", " ".join(["connect-src 'self'", *origins]))


def _lobby(lan: Lan, *, fragment_url: str, stream_url: str, back: str | None, me: Player | None) -> dict:
    # The ETag first, then the rows: if they change in between, the page holds newer rows than its ETag says and
    # the stream sends them once more, which is harmless; the other order could leave the page a change behind.
    etag, _ = live.current(lan, lambda: _lobby_rows_html(lan))
    return {"lan": lan, "fragment_url": fragment_url, "stream_url": stream_url, "back": back, "me": me,
            "poll_seconds": live.LOBBY_POLL_SECONDS, "etag": etag,
            **_lobby_rows(lan)}


@dataclass
class LobbyEntry:
    """One player on one node, with their devices' sessions there. `named`: the player has more than one device
    online, so each session shows its device's name."""

    player: Player
    sessions: list
    named: bool


def _lobby_rows(lan: Lan) -> dict:
    """Who is online now, per node: each player once per node, with their devices there. Queries: the LAN's nodes,
    and the player sessions with their players and (a subquery) their devices' names."""
    nodes = list(lan.nodes.all())
    device_name = Device.objects.filter(player=OuterRef("player"), common_name=OuterRef("common_name")).values("name")
    sessions = list(VpnSession.objects.filter(node__lan=lan, player__isnull=False, player__revoked_at__isnull=True)
                    .select_related("player").annotate(device_name=Subquery(device_name[:1]))
                    .order_by("player__nickname", "connected_since", "pk"))
    per_player = Counter(s.player_id for s in sessions)
    for node in nodes:
        groups: dict[int, list] = {}
        for s in sessions:
            if s.node_id == node.pk:
                groups.setdefault(s.player_id, []).append(s)
        node.players_online = [LobbyEntry(player=group[0].player, sessions=group, named=per_player[pk] > 1)
                               for pk, group in groups.items()]
    return {"lobby_nodes": [n for n in nodes if n.players_online or n.state == "ready"],
            "online_total": len(per_player)}


def _lobby_stream(request, lan: Lan, *, allowed) -> HttpResponse:
    """The same rows pushed as server-sent events while the lobby is open (players/lobby.py: Stream). When this
    process has no stream to spare, a 503 that the page answers by polling the fragment instead."""
    # What the page holds: the ETag it was drawn with (?etag=), or, when the browser reconnects by itself, the id
    # of the last event it got.
    held = request.headers.get("Last-Event-ID") or request.GET.get("etag")
    stream = live.Stream.open(lan, lambda: _lobby_rows_html(lan), allowed=allowed, last_etag=held)
    if stream is None:
        response = HttpResponse("The lobby is busy; it checks every few seconds instead.", status=503,
                                content_type="text/plain")
        response["Retry-After"] = str(live.STREAM_SECONDS)
        return response
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return response


def _lobby_rows_html(lan: Lan) -> str:
    return render_to_string("players/_lobby_rows.html", {"lan": lan, "me": None, **_lobby_rows(lan)})


def _lobby_fragment(request, lan: Lan, *, me: Player | None) -> HttpResponse:
    """The rows every open lobby of the LAN shares (players/lobby.py, imported as `live`), or a 304 when the asker
    has them already. They are the same for every viewer: the page marks its own player (static/js/lobby.js)."""
    etag, html = live.current(lan, lambda: _lobby_rows_html(lan))
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(html())
    response["ETag"] = etag
    response["Cache-Control"] = "no-store"  # the page's script revalidates with If-None-Match itself
    return response
