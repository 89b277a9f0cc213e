"""Issuing a player through the real service path, next to easy-rsa, on the same machine in the same run.

    .venv/bin/python benchmarks/issue_player.py [--runs 300] [--easyrsa-runs 20] [--database-url URL] [--profile]

LanHub's side is what a friend's "Join" costs on the portal, minus HTTP: ``players.services.redeem_invite`` (lock
the invite row, check the nickname, unseal the LAN's CA key, generate an EC P-256 key, sign the certificate, seal
the key, save the player, count the use, commit) followed by ``players.services.build_profile`` for the LAN's
first node (the ready nodes read, the profile rendered with the key unsealed). It runs against a real database:
a throwaway SQLite file (benchmarks/harness.py), or ``--database-url`` (a PostgreSQL database of your own).

easy-rsa's side is the usual manual equivalent, ``easyrsa build-client-full <name> nopass`` with EC prime256v1
keys in batch mode, in a temporary PKI this script initialises (``init-pki``, ``build-ca nopass``); it writes
files and renders no profile. Both medians are printed as one JSON line with ``floor`` = easy-rsa; the target is
a ratio of at most 0.01 (LanHub at least 100x faster). ``--profile`` prints where LanHub's time goes (cProfile).

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


def lanhub_runs(runs: int, profile: bool) -> list[float]:
    """Seconds per (redeem an invite + build the new player's profile), each a fresh player."""
    from players import services as player_services

    lan, host = lanhub_setup()
    invite = player_services.create_invite(lan=lan, created_by=host, max_uses=1000)
    profiler = cProfile.Profile() if profile else None
    timings = []
    for i in range(runs):
        if i and i % 1000 == 0:
            invite = player_services.create_invite(lan=lan, created_by=host, max_uses=1000)
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        player = player_services.redeem_invite(token=invite.token, nickname=f"player{i:05}", client_address="127.0.0.1")
        nodes = player_services.ready_nodes(player.lan)
        profile_text = player_services.build_profile(player, node=nodes[0], ranked=nodes).content
        timings.append(time.perf_counter() - start)
        if profiler:
            profiler.disable()
        assert "<cert>" in profile_text and "<key>" in profile_text
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    return timings


def easyrsa_runs(runs: int) -> list[float]:
    """Seconds per ``easyrsa build-client-full <name> nopass`` (EC P-256, batch) in a throwaway PKI."""
    with tempfile.TemporaryDirectory(prefix="easyrsa-bench-") as workdir:
        env = {**os.environ, "EASYRSA_PKI": f"{workdir}/pki", "EASYRSA_BATCH": "1", "EASYRSA_ALGO": "ec",
               "EASYRSA_CURVE": "prime256v1"}
        easyrsa(["init-pki"], env=env, cwd=workdir)
        # The CA's CN only for build-ca: easy-rsa 3.1 refuses EASYRSA_REQ_CN on build-client-full.
        easyrsa(["build-ca", "nopass"], env={**env, "EASYRSA_REQ_CN": "lan-bench"}, cwd=workdir)
        timings = []
        for i in range(runs):
            start = time.perf_counter()
            easyrsa(["build-client-full", f"player-{i}", "nopass"], env=env, cwd=workdir)
            timings.append(time.perf_counter() - start)
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
    with Site(database_url=options.database_url):
        from django.conf import settings

        ours = lanhub_runs(runs, options.profile)
        engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    theirs = easyrsa_runs(max(1, min(options.easyrsa_runs, 200)))
    ours_ms, theirs_ms = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
    emit(f"issue a player: {PATH_TIMED} (EC P-256, {engine}, median of {runs}) vs easyrsa build-client-full "
         f"nopass (EC P-256, median of {len(theirs)})", ours_ms, theirs_ms, unit="ms",
         target=f"ratio <= {TARGET_RATIO:g} (at least {1 / TARGET_RATIO:.0f}x faster than easy-rsa)",
         meets=ours_ms / theirs_ms <= TARGET_RATIO, speedup=round(theirs_ms / ours_ms, 1))


if __name__ == "__main__":
    main()
