"""Issuing a player: LanHub's in-process PKI next to easy-rsa, on the same machine in the same run.

    cd /work/main && .venv/bin/python benchmarks/issue_player.py [--runs 500] [--easyrsa-runs 20]

LanHub's side is what a redeemed invite costs: a fresh EC P-256 key and client certificate (lanhub.pki.issue_client)
plus the rendered .ovpn profile (players.profiles.render_profile). easy-rsa's side is the usual manual equivalent,
``easyrsa build-client-full <name> nopass`` with EC prime256v1 keys in batch mode, in a temporary PKI this script
initialises (``init-pki``, ``build-ca nopass``); it does not even render a profile. Both medians and their ratio are
printed; the target is a ratio of at least 50.

Why medians: the first runs pay for imports and cold caches, and the occasional scheduler hiccup should not decide
the comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lanhub import pki  # noqa: E402
from players.profiles import Remote, render_profile  # noqa: E402

EASYRSA = "/usr/share/easy-rsa/easyrsa"
TARGET_RATIO = 50


def lanhub_runs(runs: int) -> list[float]:
    """Seconds per (issue a player + render its profile); the LAN's CA and tls-crypt key exist already."""
    now = datetime.now(timezone.utc)
    ca = pki.create_ca(name="lan-bench", now=now)
    tls_crypt = pki.make_tls_crypt_key()
    remotes = [Remote("hz.example.net", 1194, "udp"), Remote("hz.example.net", 443, "tcp")]
    timings = []
    for i in range(runs):
        start = time.perf_counter()
        player = pki.issue_client(ca=ca, common_name=f"player-{i}", now=now)
        render_profile(
            lan_name="bench", nickname=f"player-{i}", remotes=remotes, ca_pem=ca.cert_pem,
            cert_pem=player.cert_pem, key_pem=player.key_pem, tls_crypt=tls_crypt,
        )
        timings.append(time.perf_counter() - start)
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
    parser.add_argument("--runs", type=int, default=500, help="LanHub issue+render runs (default 500)")
    parser.add_argument("--easyrsa-runs", type=int, default=20, help="easy-rsa build-client-full runs (default 20)")
    options = parser.parse_args()
    ours = statistics.median(lanhub_runs(options.runs))
    theirs = statistics.median(easyrsa_runs(options.easyrsa_runs))
    ratio = theirs / ours
    print(f"lanhub  issue_client + render_profile: median {ours * 1000:8.3f} ms over {options.runs} runs")
    print(f"easyrsa build-client-full nopass (EC): median {theirs * 1000:8.3f} ms over {options.easyrsa_runs} runs")
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"ratio easyrsa/lanhub: {ratio:.1f}x ({verdict} the {TARGET_RATIO}x target)")


if __name__ == "__main__":
    main()
