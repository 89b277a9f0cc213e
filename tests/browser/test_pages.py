"""The pages as a person uses them, in a real browser against a real server (live_server).

Node addresses are loopback addresses (127.0.0.x) on ports nothing listens on: the player page's script times a
request to every node, and a test must never send traffic anywhere but this machine.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from nodes import services as node_services
from nodes.models import Link, LinkState, Node, NodeState, RevokedCertificate, SyncRun, SyncStatus, VpnSession
from players import lobby
from players import services as player_services
from tests.browser.conftest import PHONE, SCREENSHOTS, screenshot

PASSWORD = "a-long-test-password"


@pytest.fixture
def cast(transactional_db):
    """Alice hosts "Game Night" with Hangzhou and Hong Kong ready; charlie hosts another LAN; bob has joined."""
    User = get_user_model()
    alice = User.objects.create_user("alice", "alice@example.org", PASSWORD)
    charlie = User.objects.create_user("charlie", "charlie@example.org", PASSWORD)
    lan = node_services.create_lan(owner=alice, name="Game Night", slug="gamenight")
    node_services.create_lan(owner=charlie, name="Office", slug="office")
    hangzhou = node_services.create_node(lan=lan, name="hangzhou", region="asia/cn/east", country="CN",
                                         public_address="127.0.0.2", ssh_host="127.0.0.2", tcp_port=47001,
                                         latitude=30.27, longitude=120.15)
    hongkong = node_services.create_node(lan=lan, name="hongkong", region="asia/hk", country="HK",
                                         public_address="127.0.0.3", ssh_host="127.0.0.3", tcp_port=47002)
    Node.objects.filter(lan=lan).update(state=NodeState.READY, openvpn_version="2.6.14")
    invite = player_services.create_invite(lan=lan, created_by=alice, note="Friday crew",
                                           ttl=dt.timedelta(hours=48), max_uses=5)
    bob = player_services.redeem_invite(token=invite.token, nickname="bob")
    player_services.clear_rate(player_services.join_rate_key("127.0.0.1"))
    return {"alice": alice, "charlie": charlie, "lan": lan, "hangzhou": hangzhou, "hongkong": hongkong,
            "invite": invite, "bob": bob}


def sign_in(page, live_server, username, next_url="/lans/"):
    page.goto(f"{live_server.url}/accounts/login/?next={next_url}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}{next_url}")


def test_an_admin_adds_a_hong_kong_node_and_sees_its_sync_queued(page, live_server, cast):
    get_user_model().objects.create_superuser("root", "root@example.org", PASSWORD)
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.goto(f"{live_server.url}/admin/nodes/node/add/")
    # As a new operator would: the name as people say it; short name and SSH host left empty (derived).
    page.fill("#id_lan", str(cast["lan"].pk))
    page.fill("#id_display_name", "Hong Kong")
    page.fill("#id_region", "asia/hk")
    page.fill("#id_public_address", "127.0.0.4")
    page.fill("#id_country", "HK")
    page.click("input[name=_continue]")  # "Save and continue editing": stay on the node's page

    node = Node.objects.get(display_name="Hong Kong")
    assert (node.name, node.ssh_host) == ("hong-kong", "127.0.0.4")
    page.wait_for_url(re.compile(rf"/admin/nodes/node/{node.pk}/change/"))
    assert node.sync_runs.first().status == SyncStatus.QUEUED
    sync = page.locator(".lh-sync")
    assert "Queued" in sync.locator(".lh-sync-step").inner_text()
    # static/js/sync-progress.js polled /nodes/<pk>/status.json (as an operator) and marked the element.
    page.wait_for_selector(".lh-sync[data-status='queued'][data-active='true']")


def test_a_friend_joins_and_downloads_a_profile_that_starts_with_the_chosen_node(new_page, live_server, cast):
    page = new_page(PHONE)
    page.goto(f"{live_server.url}/join/{cast['invite'].token}/")
    assert "Game Night" in page.inner_text(".hero")
    page.fill("#id_nickname", "dave")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/me/[A-Za-z0-9_-]{32}/$"))
    # The page times each node from the browser and swaps in the measured ranking; wait for it to settle.
    page.wait_for_selector("#ranking[data-measure='done']")
    assert page.locator("#ranking li").count() == 2

    # Pick the server the ranking did not put first, so the download proves the choice took effect.
    other = page.locator("#ranking li:not(.chosen)")
    name = other.locator(".name").inner_text()
    other.get_by_role("button", name="Use this server").click()
    page.wait_for_selector(".messages .success")
    assert name in page.inner_text("#download")
    address, tcp_port = {"hangzhou": ("127.0.0.2", "47001"), "hongkong": ("127.0.0.3", "47002")}[name]
    page.wait_for_selector("#ranking[data-measure='done']")
    screenshot(page, "player")

    with page.expect_download() as info:
        page.click("#download-button")
    download = info.value
    assert download.suggested_filename == f"gamenight-dave-{name}.ovpn"
    profile = open(download.path()).read()
    remotes = re.findall(r"^remote (\S+) (\d+) (udp|tcp)$", profile, flags=re.M)
    assert remotes[:2] == [(address, "1194", "udp"), (address, tcp_port, "tcp")]
    for tag in ("ca", "cert", "key", "tls-crypt"):
        assert f"<{tag}>" in profile and f"</{tag}>" in profile
    assert re.search(r"(?m)^client$", profile)


def test_the_lobby_shows_a_player_coming_online_without_a_reload(new_page, live_server, cast):
    bob, hongkong = cast["bob"], cast["hongkong"]
    page = new_page(PHONE)
    polls = []
    page.on("request", lambda r: polls.append(r.url) if "/lobby/live/" in r.url else None)
    with page.expect_response(lambda r: "/lobby/stream/" in r.url and r.status == 200, timeout=15_000):
        page.goto(f"{live_server.url}/me/{bob.token}/lobby/")
    assert "0 players online" in page.inner_text("#lobby")
    page.evaluate("window.__noReload = true")  # survives only if the page is never reloaded

    # The stream brings the new rows; the page asks for nothing.
    VpnSession.objects.create(node=hongkong, instance="server-udp", common_name=bob.common_name, player=bob,
                              vpn_address="10.2.0.6", connected_since=timezone.now())
    page.wait_for_selector(".lobby-player[data-player='bob']", timeout=15_000)
    assert page.evaluate("window.__noReload") is True
    assert "10.2.0.6" in page.inner_text(".lobby-player[data-player='bob']")
    assert "bob (you)" in page.inner_text("#lobby")
    screenshot(page, "lobby")
    VpnSession.objects.filter(player=bob).delete()
    page.wait_for_selector(".lobby-player[data-player='bob']", state="detached", timeout=15_000)
    assert "0 players online" in page.inner_text("#lobby")
    assert polls == []
    assert page.evaluate("window.__noReload") is True


def test_with_no_stream_to_spare_the_lobby_polls_and_still_shows_changes(new_page, live_server, cast, monkeypatch):
    bob, hongkong = cast["bob"], cast["hongkong"]
    busy = threading.BoundedSemaphore(1)
    busy.acquire()
    monkeypatch.setattr(lobby, "_stream_slots", busy)  # every stream of this process is taken
    page = new_page(PHONE)
    statuses = []
    page.on("response", lambda r: statuses.append(r.status) if "/lobby/live/" in r.url else None)
    with page.expect_response(lambda r: "/lobby/stream/" in r.url and r.status == 503, timeout=15_000):
        page.goto(f"{live_server.url}/me/{bob.token}/lobby/")
    # While nothing changes, each poll is a 304 without a body; when bob comes, the next poll brings new rows.
    with page.expect_response(lambda r: "/lobby/live/" in r.url and r.status == 304, timeout=15_000):
        pass
    VpnSession.objects.create(node=hongkong, instance="server-udp", common_name=bob.common_name, player=bob,
                              vpn_address="10.2.0.6", connected_since=timezone.now())
    page.wait_for_selector(".lobby-player[data-player='bob']", timeout=15_000)
    assert "bob (you)" in page.inner_text("#lobby")
    assert 304 in statuses and 200 in statuses


def test_a_host_cannot_open_another_hosts_lan(page, live_server, cast):
    sign_in(page, live_server, "charlie")
    response = page.goto(f"{live_server.url}/lans/gamenight/")
    assert response.status == 404
    assert "Game Night" not in page.content()
    assert page.goto(f"{live_server.url}/lans/gamenight/topology.svg").status == 404


def test_a_host_adds_hong_kong_from_the_dashboard_leaving_the_optional_fields_empty(page, live_server, cast):
    sign_in(page, live_server, "alice", "/lans/gamenight/")
    form = page.locator("#add-server form")
    form.locator("#id_display_name").fill("Hong Kong")
    form.locator("#id_public_address").fill("127.0.0.5")
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/nodes/\d+/$"))
    assert page.inner_text("h1") == "Hong Kong"
    node = Node.objects.get(display_name="Hong Kong")
    assert (node.name, node.ssh_host, node.ssh_user, node.udp_port) == ("hong-kong", "127.0.0.5", "root", 1194)

    # The same name again is a clear error on the form, not a traceback and not a second server.
    page.goto(f"{live_server.url}/lans/gamenight/")
    form.locator("#id_display_name").fill("hong kong")
    form.locator("#id_public_address").fill("127.0.0.6")
    form.locator("button[type=submit]").click()
    assert "This LAN already has a server named “hong kong”." in page.inner_text("#add-server")
    assert Node.objects.filter(lan=cast["lan"]).count() == 3


def test_after_measuring_the_whole_player_page_names_one_server(new_page, live_server, cast):
    """The estimate picks Hangzhou (the LAN's default); the browser finds Hangzhou silent and Hong Kong quick, so
    the header, the download button, the QR code, the Linux steps and the ranking must all switch to Hong Kong."""
    lan, hangzhou, hongkong = cast["lan"], cast["hangzhou"], cast["hongkong"]
    lan.default_node = hangzhou
    lan.save(update_fields=["default_node"])
    player = player_services.redeem_invite(token=cast["invite"].token, nickname="erin")
    # Hangzhou's probe port accepts connections and never answers (the probe times out); nothing listens on Hong
    # Kong's, so its probe fails at once: measured, Hong Kong is the nearer.
    silent = socket.socket()
    silent.bind((hangzhou.public_address, hangzhou.tcp_port))
    silent.listen(16)
    try:
        page = new_page(PHONE)
        page.goto(f"{live_server.url}/me/{player.token}/")
        assert page.get_attribute("[data-chosen-node]", "data-chosen-node") == str(hangzhou.pk)  # the estimate
        page.wait_for_selector("#ranking[data-measure='done']", timeout=30_000)
    finally:
        silent.close()
    assert page.get_attribute("[data-chosen-node]", "data-chosen-node") == str(hongkong.pk)
    assert page.inner_text("[data-chosen-node]") == hongkong.display_name
    assert page.get_attribute("#download-button", "href").endswith(f"/profile/{hongkong.name}.ovpn")
    assert page.locator("#ranking li.chosen").get_attribute("data-node") == str(hongkong.pk)
    assert page.locator("#ranking li .badge", has_text="your server").count() == 1
    assert hongkong.display_name in page.inner_text("#download-qr")
    steps = page.inner_text("[data-nmcli]")
    assert f"file gamenight-erin-{hongkong.name}.ovpn" in steps
    assert f"modify gamenight-erin-{hongkong.name} ipv4.never-default yes" in steps
    with page.expect_download() as info:
        page.click("#download-button")
    assert info.value.suggested_filename == f"gamenight-erin-{hongkong.name}.ovpn"


def test_the_host_dashboard_shows_servers_topology_invites_and_players(page, live_server, cast):
    lan, hangzhou, hongkong, bob = cast["lan"], cast["hangzhou"], cast["hongkong"], cast["bob"]
    Link.objects.filter(lan=lan).update(state=LinkState.UP, rtt_ms=31.0)
    VpnSession.objects.create(node=hongkong, instance="server-udp", common_name=bob.common_name, player=bob,
                              vpn_address="10.2.0.6", connected_since=timezone.now())
    run = hangzhou.sync_runs.first()
    SyncRun.objects.filter(pk=run.pk).update(status=SyncStatus.RUNNING, current_step="upload configs", progress=60)
    SyncRun.objects.filter(node=hongkong).update(status=SyncStatus.COMPLETED, progress=100)

    sign_in(page, live_server, "alice")
    page.goto(f"{live_server.url}/lans/gamenight/")
    card = page.locator(".node-card", has_text="hangzhou")
    card.locator(".lh-sync[data-status='running']").wait_for()  # set by sync-progress.js from status.json
    assert "Running — upload configs" in card.locator(".lh-sync-step").inner_text()
    assert page.locator("img.topology").evaluate("img => img.complete && img.naturalWidth > 0")
    assert "10.2.0.6" in page.inner_text("#players")
    assert lan.ssh_public_key in page.inner_text("#add-server")
    screenshot(page, "dashboard")


def test_the_host_reissues_and_revokes_a_player_and_withdraws_an_invite_from_the_dashboard(page, live_server, cast):
    # Every row's buttons submit one shared form (each names its own formaction): what the browser posts must be
    # that row's action, with the page's CSRF token.
    lan, bob, invite = cast["lan"], cast["bob"], cast["invite"]
    carol = player_services.redeem_invite(token=invite.token, nickname="carol")
    old_serial = bob.first_device.serial
    sign_in(page, live_server, "alice", "/lans/gamenight/")
    page.locator("#players tr", has_text="bob").get_by_role("button", name="Reissue").click()
    page.wait_for_url(f"{live_server.url}/lans/gamenight/#players")
    assert "bob has new certificates" in page.inner_text("body")
    page.locator("#players tr", has_text="carol").get_by_role("button", name="Revoke").click()
    page.wait_for_url(f"{live_server.url}/lans/gamenight/#players")
    assert "carol is revoked" in page.inner_text("body")
    page.locator(".invite", has_text="Friday crew").get_by_role("button", name="Withdraw").click()
    page.wait_for_url(f"{live_server.url}/lans/gamenight/#invites")
    assert "Invite withdrawn" in page.inner_text("body")
    bob.refresh_from_db()
    carol.refresh_from_db()
    invite.refresh_from_db()
    assert bob.revoked_at is None and RevokedCertificate.objects.filter(lan=lan, serial=old_serial).exists()
    assert carol.revoked_at is not None
    assert invite.revoked_at is not None


def test_the_host_ticks_a_game_and_a_custom_port_and_the_player_page_names_them(page, live_server, cast):
    sign_in(page, live_server, "alice", "/lans/gamenight/")
    games = page.locator("#games")
    games.locator("input[value=directplay]").check()
    games.locator("#id_discovery_ports").fill("7777-7780")
    games.locator("button[type=submit]").click()
    page.wait_for_url(f"{live_server.url}/lans/gamenight/#games")
    assert games.locator("input[value=directplay]").is_checked()
    assert games.locator("#id_discovery_ports").input_value() == "7777-7780"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    games.screenshot(path=str(SCREENSHOTS / "games.png"))
    games.locator("#id_discovery_ports").fill("70000")
    games.locator("button[type=submit]").click()
    assert "between 1 and 65535" in page.locator("#games").inner_text()

    page.goto(f"{live_server.url}/me/{cast['bob'].token}/")
    text = page.locator("#lan-play").inner_text()
    assert "Age of Empires II and other DirectPlay games" in text and "other games on UDP 7777-7780" in text
    assert "join by IP" in text


def test_a_player_adds_a_device_downloads_its_own_profile_and_switches_it_off_alone(page, live_server, cast):
    bob = cast["bob"]
    first = bob.first_device
    page.goto(f"{live_server.url}/me/{bob.token}/")
    page.fill("#devices #id_name", "laptop")
    page.click("#devices button:has-text('Add a device')")
    page.wait_for_selector(".messages .success")
    laptop = bob.devices.get(name="laptop")
    row = page.locator(f"#device-{laptop.ref}")
    assert "laptop" in row.inner_text()
    with page.expect_download() as info:
        row.get_by_role("link", name="Download profile").click()
    download = info.value
    assert re.fullmatch(r"gamenight-bob-laptop-(hangzhou|hongkong)\.ovpn", download.suggested_filename)
    profile = open(download.path()).read()
    assert laptop.cert_pem.strip() in profile and first.cert_pem.strip() not in profile

    # Both devices online: the lobby shows bob once, with both addresses.
    VpnSession.objects.create(node=cast["hangzhou"], instance="server-udp", common_name=first.common_name,
                              player=bob, vpn_address="10.0.1.5", connected_since=timezone.now())
    VpnSession.objects.create(node=cast["hangzhou"], instance="server-udp", common_name=laptop.common_name,
                              player=bob, vpn_address="10.0.1.6", connected_since=timezone.now())
    page.goto(f"{live_server.url}/me/{bob.token}/lobby/")
    assert page.locator(".lobby-player[data-player='bob']").count() == 1
    assert page.locator(".lobby-player[data-player='bob'] .lobby-device").count() == 2
    assert "1 player online" in page.inner_text("#lobby")
    VpnSession.objects.filter(player=bob).delete()

    # "I lost this device" on the laptop: it goes, the first device stays, and the page moves to a new address.
    page.goto(f"{live_server.url}/me/{bob.token}/")
    page.locator(f"#device-{laptop.ref}").get_by_role("button", name="I lost this device").click()
    page.wait_for_selector(".messages .success")
    assert "switched off" in page.inner_text(".messages")
    assert page.locator(f"#device-{laptop.ref}").count() == 0
    assert page.locator(f"#device-{first.ref}").count() == 1
    bob.refresh_from_db()
    assert page.url.endswith(f"/me/{bob.token}/")
