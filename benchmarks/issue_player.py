"""Issuing a player through the real service path, next to easy-rsa, on the same machine in the same run.

    .venv/bin/python benchmarks/issue_player.py [--runs 300] [--easyrsa-runs 20] [--database-url URL] [--profile]

LanHub's side is what a friend's "Join" costs on the portal, minus HTTP: ``players.services.redeem_invite`` (count
the use, which locks the invite row and returns it with its LAN, unseal the LAN's CA key, generate an EC P-256 key,
sign the certificate, seal the key, save the player (its nickname's uniqueness checked by the constraint), save the
device, commit) followed by ``players.services.build_profile`` for the LAN's first node (the ready nodes got as the
download gets them, by the LAN's nodes_version, here the one read with the invite; the profile rendered). It runs
against a real database: a throwaway SQLite file (benchmarks/harness.py, WAL with synchronous FULL, so every commit
waits for its fsync), or ``--database-url`` (a PostgreSQL database of your own).

easy-rsa's side is the usual manual equivalent, ``easyrsa build-client-full <name> nopass`` with EC prime256v1
keys in batch mode, in a temporary PKI this script initialises (``init-pki``, ``build-ca nopass``); it writes
files and renders no profile. The two sides run interleaved in four rounds, so a machine whose load changes
during the run slows both. Both medians are printed as one JSON line with ``floor`` = easy-rsa; the target is a
ratio of at most 0.01 (LanHub at least 100x faster). ``--profile`` prints where LanHub's time goes (cProfile;
``BENCH_SORT=tottime`` sorts it by own time).

Why medians: the first runs pay for imports and cold caches, and the occasional scheduler hiccup should not decide
the comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Site, emit  # noqa: E402

EASYRSA = "/usr/share/easy-rsa/easyrsa"
TARGET_RATIO = 0.01
PATH_TIMED = "players.services.redeem_invite + players.services.build_profile"
ROUNDS = 4


def lanhub_setup():
    """A host, a LAN (CA, tls-crypt key) with two ready nodes, and an invite with room for every run."""
    from django.contrib.auth import get_user_model

    from nodes import services as node_services
    from nodes.models import Node, NodeState
    from players import services as player_services

    host = get_user_model().objects.create_user("bench-host")
    lan = node_services.create_lan(owner=host, name="Bench LAN", slug="bench")
    for name, address in (("hangzhou", "203.0.113.10"), ("hongkong", "203.0.113.11")):
        node_services.create_node(lan=lan, name=name, region="asia", public_address=address, ssh_host=address)
    Node.objects.filter(lan=lan).update(state=NodeState.READY, healthy=True)
    return lan, host


class LanHubIssuer:
    """Issues players on one LAN through the real service path, one fresh nickname each."""

    def __init__(self, profile: bool):
        from players import services as player_services

        self.services = player_services
        self.lan, self.host = lanhub_setup()
        self.invite = player_services.create_invite(lan=self.lan, created_by=self.host, max_uses=1000)
        self.profiler = cProfile.Profile() if profile else None
        self.issued = 0

    def runs(self, count: int) -> list[float]:
        """Seconds per (redeem an invite + build the new player's profile)."""
        services, timings = self.services, []
        for _ in range(count):
            i = self.issued
            if i and i % 1000 == 0:
                self.invite = services.create_invite(lan=self.lan, created_by=self.host, max_uses=1000)
            if self.profiler:
                self.profiler.enable()
            start = time.perf_counter()
            player = services.redeem_invite(token=self.invite.token, nickname=f"player{i:05}",
                                            client_address="127.0.0.1")
            # As the download reads them (players/views.py): by the LAN's nodes_version, read with the invite.
            nodes = services.ready_node_rows(player.lan_id, version=player.lan.nodes_version)
            profile_text = services.build_profile(player, node=nodes[0], ranked=nodes,
                                                  device=player.joined_device).content
            timings.append(time.perf_counter() - start)
            if self.profiler:
                self.profiler.disable()
            assert "<cert>" in profile_text and "<key>" in profile_text
            self.issued += 1
        return timings

    def print_profile(self) -> None:
        if self.profiler:
            pstats.Stats(self.profiler, stream=sys.stderr).sort_stats(os.environ.get("BENCH_SORT", "cumulative")).print_stats(40)


class EasyRsa:
    """``easyrsa build-client-full <name> nopass`` (EC P-256, batch) in a throwaway PKI."""

    def __init__(self, workdir: str):
        self.workdir, self.issued = workdir, 0
        self.env = {**os.environ, "EASYRSA_PKI": f"{workdir}/pki", "EASYRSA_BATCH": "1", "EASYRSA_ALGO": "ec",
                    "EASYRSA_CURVE": "prime256v1"}
        easyrsa(["init-pki"], env=self.env, cwd=workdir)
        # The CA's CN only for build-ca: easy-rsa 3.1 refuses EASYRSA_REQ_CN on build-client-full.
        easyrsa(["build-ca", "nopass"], env={**self.env, "EASYRSA_REQ_CN": "lan-bench"}, cwd=workdir)

    def runs(self, count: int) -> list[float]:
        timings = []
        for _ in range(count):
            start = time.perf_counter()
            easyrsa(["build-client-full", f"player-{self.issued}", "nopass"], env=self.env, cwd=self.workdir)
            timings.append(time.perf_counter() - start)
            self.issued += 1
        return timings


def easyrsa(args: list[str], *, env: dict[str, str], cwd: str) -> None:
    result = subprocess.run([EASYRSA, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"easyrsa {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="LanHub players issued (default 300)")
    parser.add_argument("--easyrsa-runs", type=int, default=20, help="easy-rsa build-client-full runs (default 20)")
    parser.add_argument("--database-url", help="a database of your own instead of a throwaway SQLite file")
    parser.add_argument("--profile", action="store_true", help="print LanHub's cProfile to stderr")
    options = parser.parse_args()
    runs = max(1, min(options.runs, 5000))
    easyrsa_runs = max(1, min(options.easyrsa_runs, 200))
    ours, theirs = [], []
    with Site(database_url=options.database_url), tempfile.TemporaryDirectory(prefix="easyrsa-bench-") as workdir:
        from django.conf import settings

        lanhub, reference = LanHubIssuer(options.profile), EasyRsa(workdir)
        # Interleaved in rounds, so that both sides see the same machine load (a shared machine's load changes
        # within a minute).
        for round_ in range(ROUNDS):
            ours += lanhub.runs(runs * (round_ + 1) // ROUNDS - runs * round_ // ROUNDS)
            theirs += reference.runs(easyrsa_runs * (round_ + 1) // ROUNDS - easyrsa_runs * round_ // ROUNDS)
        lanhub.print_profile()
        engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    ours_ms, theirs_ms = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
    emit(f"issue a player: {PATH_TIMED} (EC P-256, {engine}, median of {runs}) vs easyrsa build-client-full "
         f"nopass (EC P-256, median of {len(theirs)})", ours_ms, theirs_ms, unit="ms",
         target=f"ratio <= {TARGET_RATIO:g} (at least {1 / TARGET_RATIO:.0f}x faster than easy-rsa)",
         meets=ours_ms / theirs_ms <= TARGET_RATIO, speedup=round(theirs_ms / ours_ms, 1))


if __name__ == "__main__":
    main()
