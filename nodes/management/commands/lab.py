"""`manage.py lab up|down|status`: the whole LanHub on this machine, servers and players in network namespaces."""

import json
import secrets
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from lab.netns import Lab, LabError
from nodes import services, syncing
from nodes.models import Lan, SyncRun, SyncStatus
from players import services as player_services

def pointer() -> Path:
    """Where `lab up` records the lab it left running, for `lab down` in a later process."""
    return Path(settings.VAR_DIR) / "lab.json"


# Regions for the names the README uses; any other name gets its own region.
REGIONS = {"hangzhou": "asia/cn/east", "shanghai": "asia/cn/east", "beijing": "asia/cn/north",
           "hongkong": "asia/hk", "singapore": "asia/sg", "tokyo": "asia/jp", "frankfurt": "europe/de"}
MAX_SYNC_ROUNDS = 10


class Command(BaseCommand):
    help = (
        "Build (up) or remove (down) a local LanHub lab: one network namespace per server running its own sshd, "
        "provisioned by LanHub over SSH, and one per player connected with a downloaded profile. Needs root, "
        "openvpn and sshd. Everything stays inside the namespaces it creates (underlay 203.0.113.0/24 and "
        "198.51.100.0/24)."
    )

    def add_arguments(self, parser):
        parser.add_argument("action", choices=("up", "down", "status"))
        parser.add_argument("--nodes", default="hangzhou,hongkong", help="comma-separated server names")
        parser.add_argument("--players", default="alice,bob", help="comma-separated player nicknames")
        parser.add_argument("--lan", default="lab", help="slug of the LAN the lab uses (made anew)")

    def handle(self, *args, action, nodes, players, lan, **options):
        if action == "down":
            return self.down()
        if action == "status":
            return self.status()
        names = [n.strip() for n in nodes.split(",") if n.strip()]
        nicks = [p.strip() for p in players.split(",") if p.strip()]
        if not names:
            raise CommandError("Name at least one server with --nodes.")
        self.up(names, nicks, lan)

    # --- up -----------------------------------------------------------------------------------------------------

    def up(self, names, nicks, slug):
        if pointer().exists():
            raise CommandError(f"A lab is up already ({pointer()}); run `manage.py lab down` first.")
        reason = Lab.requirements_missing()
        if reason:
            raise CommandError(f"The lab cannot run here: {reason}")
        started = time.monotonic()
        try:
            lab = Lab()
        except LabError as exc:
            raise CommandError(str(exc)) from None
        try:
            lan, password = self.make_lan(slug)
            self.add_servers(lab, lan, names)
            self.connect_players(lab, lan, names, nicks)
        except BaseException:
            lab.down()
            raise
        lab.detach()
        pointer().write_text(json.dumps({"state_dir": str(lab.state_dir), "lan": lan.pk}))
        self.stdout.write(self.style.SUCCESS(
            f"Lab up in {time.monotonic() - started:.1f}s: LAN {lan.slug!r} owned by 'labhost' "
            f"(password {password}). `manage.py lab down` removes it."))

    def make_lan(self, slug):
        User = get_user_model()
        password = secrets.token_urlsafe(9)
        host, _ = User.objects.get_or_create(username="labhost", defaults={"email": "labhost@localhost"})
        host.set_password(password)
        host.save()
        Lan.objects.filter(owner=host, slug=slug).delete()
        return services.create_lan(owner=host, name=f"Lab {slug}", slug=slug), password

    def add_servers(self, lab, lan, names):
        for name in names:
            host = lab.add_node(name)
            host.authorize(lan.ssh_public_key)
            services.create_node(lan=lan, name=name, region=REGIONS.get(name, name), public_address=host.address,
                                 ssh_host=host.address)
            self.stdout.write(f"server {name}: namespace {host.ns}, address {host.address}")
        self.run_queued_syncs(lan)

    def run_queued_syncs(self, lan):
        """Carry out the syncs the services queued, here and now, until none is left (bounded)."""
        for _ in range(MAX_SYNC_ROUNDS):
            # Oldest servers first: they are the upstreams, so a new link finds its other end already running.
            queued = list(SyncRun.objects.filter(node__lan=lan, status=SyncStatus.QUEUED).select_related("node")
                          .order_by("node__created_at", "created_at"))
            if not queued:
                return
            for run in queued:
                result = syncing.run_sync(run.node, run_id=run.pk)
                verdict = result.status if not result.error else f"{result.status}: {result.error}"
                self.stdout.write(f"  sync {run.node.name}: {verdict} ({run.reason})")
                if result.status in (SyncStatus.FAILED, SyncStatus.ERRORED):
                    raise CommandError(f"Provisioning {run.node.name} failed: {result.error}")
        raise CommandError(f"Syncs were still queued after {MAX_SYNC_ROUNDS} rounds.")

    def connect_players(self, lab, lan, names, nicks):
        if not nicks:
            return
        invite = player_services.create_invite(lan=lan, note="lab", max_uses=len(nicks))
        ranked = player_services.ready_nodes(lan)
        by_name = {n.name: n for n in ranked}
        addresses = {}
        for index, nick in enumerate(nicks):
            player = player_services.redeem_invite(token=invite.token, nickname=nick)
            node = by_name[names[index % len(names)]]
            profile = player_services.build_profile(player, node=node, ranked=ranked)
            host = lab.add_player(nick)
            host.start_openvpn(profile.content)
            addresses[nick] = host.wait_for_tunnel(timeout=30)
            self.stdout.write(f"player {nick}: on {node.name}, VPN address {addresses[nick]}")
        self.ping_matrix(lab, addresses)

    def ping_matrix(self, lab, addresses):
        for a in addresses:
            for b, address in addresses.items():
                if a != b:
                    rtt = self.ping(lab, lab.players[a], address)
                    shown = f"{rtt:.2f} ms" if rtt is not None else "NO ANSWER"
                    self.stdout.write(f"  ping {a} -> {b} ({address}): {shown}")

    @staticmethod
    def ping(lab, host, address, attempts=5):
        """The first packets may race the last route the clients install: try a few times (bounded)."""
        for _ in range(attempts):
            rtt = lab.ping(host, address, count=1, timeout=1)
            if rtt is not None:
                return rtt
        return None

    # --- down / status ------------------------------------------------------------------------------------------

    def load(self):
        if not pointer().exists():
            return None, None
        recorded = json.loads(pointer().read_text())
        try:
            return Lab.load(recorded["state_dir"]), recorded
        except (OSError, ValueError, KeyError):
            return None, recorded

    def down(self):
        lab, recorded = self.load()
        if recorded is None:
            self.stdout.write("No lab is up.")
            return
        if lab is not None:
            lab.down()
        Lan.objects.filter(pk=recorded.get("lan")).delete()
        pointer().unlink()
        self.stdout.write(self.style.SUCCESS("Lab removed: namespaces, processes, routes and its LAN."))

    def status(self):
        lab, _ = self.load()
        if lab is None:
            self.stdout.write("No lab is up.")
            return
        for name, host in lab.nodes.items():
            self.stdout.write(f"server {name}: {host.ns} {host.address}")
        for name, host in lab.players.items():
            pid = host.openvpn_pid()
            self.stdout.write(f"player {name}: {host.ns} {host.address} openvpn {'running' if pid else 'stopped'}")
