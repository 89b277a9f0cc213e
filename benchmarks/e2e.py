"""The end-to-end figures: run the real-OpenVPN scenario and print what it measured, against its target.

    cd /work/main && .venv/bin/python benchmarks/e2e.py              # runs tests/e2e (root, openvpn, sshd)
    cd /work/main && .venv/bin/python benchmarks/e2e.py --from-file  # only prints var/e2e-figures.json
    cd /work/main && .venv/bin/python benchmarks/e2e.py --vm         # also runs tests/vm (QEMU Debian VMs)

The VM figures (image build cold and cached, per layer; cold boot and clone restore to SSH; bare VM register -> ready
with the apt install; reboot -> LAN healed) come from var/vm-figures.json, which tests/vm writes on every run (`make
test` included); they are printed after the namespace figures, with the time the file was written. A figure the run
did not measure (a cold build, when the image was cached) is left out; "when it was built" rows come from the
image's own record.

The run is `.venv/bin/python -m pytest tests/e2e -q -s -p no:cacheprovider`; the test builds the Hangzhou + Hong Kong
lab in network namespaces and writes var/e2e-figures.json when it passes. Target: the two-node scenario (steps 1-4:
register both servers, invite, join, download, tunnels up, traffic across servers) under 60 s.

If the run fails, the figures are not printed from an older file as if they were new: the script says the test
failed and exits with its status. The run gets a Redis cache prefix and Celery queue of its own (see
isolated_redis). The run is bounded: it is stopped after --timeout seconds (default 900).

The test records register -> ready per node (register_to_ready_<node>_s: from the node's row being created to its
first completed sync) and whether every step passed ("completed"); a failed run still writes the steps it got
through, and this script then says the test failed instead of presenting them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "var" / "e2e-figures.json"
VM_FIGURES = ROOT / "var" / "vm-figures.json"
VM_ROWS = (  # key, label, unit
    ("debootstrap_now_s", "VM debootstrap of the Debian tree, cold", "s"),
    ("debootstrap_recorded_s", "VM debootstrap of the Debian tree (when it was made)", "s"),
    ("image_build_cold_base_s", "VM image build, cold: base (on the tree)", "s"),
    ("image_build_cold_base_recorded_s", "VM image build, cold: base (when built)", "s"),
    ("image_build_cached_base_s", "VM image build, cached: base", "s"),
    ("image_build_cold_preloaded_s", "VM image build, cold: preloaded (+ apt)", "s"),
    ("image_build_cold_preloaded_recorded_s", "VM image build, cold: preloaded (when built)", "s"),
    ("image_build_cached_preloaded_s", "VM image build, cached: preloaded", "s"),
    ("saved_state_made_base_s", "VM saved state made: base (cold boot + save)", "s"),
    ("saved_state_made_preloaded_s", "VM saved state made: preloaded", "s"),
    ("cold_boot_to_booted_s", "VM cold boot -> booted (when the state was saved)", "s"),
    ("cold_boot_to_ssh_s", "VM cold boot -> SSH answers (the reboot)", "s"),
    ("clone_restore_to_ssh_s", "VM clone restored -> SSH answers", "s"),
    ("bare_vm_register_to_ready_with_apt_s", "bare VM register -> ready (apt install)", "s"),
    ("reboot_to_lan_healed_s", "VM reboot -> players across it again", "s"),
)
TARGET_KEY, TARGET_S = "two_node_scenario_s", 60.0
PER_NODE = re.compile(r"^register_to_ready_(?P<node>.+)_s$")

ROWS = (  # key, label, unit
    ("register_to_ready_both_s", "register -> ready, both nodes", "s"),
    ("profile_to_tunnel_up_s", "profile -> tunnel up (slower of alice, bob)", "s"),
    ("ping_across_servers_ms", "ping RTT alice -> bob across both servers", "ms"),
    (TARGET_KEY, "two-node scenario, steps 1-4", "s"),
    ("revoke_to_session_killed_s", "revoke -> session killed", "s"),
    ("drift_repair_to_alice_back_s", "server killed -> drift repair -> alice back", "s"),
    ("whole_scenario_s", "whole scenario, steps 1-8", "s"),
)


def isolated_redis() -> dict[str, str]:
    """A cache prefix and a Celery queue of this run's own on the shared Redis.

    Without them the run shares `lanhub:1:join-rate:127.0.0.1` with every earlier run and with `make run` (the test
    joins from 127.0.0.1, so after a few runs in an hour the join view answers 429), and its worker consumes, and
    real_worker purges, the `lanhub` queue that any other checkout's tests use at the same time.
    """
    run = f"lanhub-e2e-{os.getpid()}"
    return {"CACHE_PREFIX": run, "CELERY_QUEUE": run}


def run_e2e(timeout: float, paths: tuple[str, ...] = ("tests/e2e",)) -> int:
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", *paths, "-q", "-s",
               "-p", "no:cacheprovider"]
    print("$ " + " ".join(command), flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, env={**os.environ, **isolated_redis()}, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"{' '.join(paths)} did not finish within {timeout:.0f} s and was stopped")
        return 124


def print_figures(figures: dict[str, float], source: str) -> None:
    print(f"\nLanHub end-to-end figures ({source})")
    width = 48
    print(f"{'figure':<{width}}{'value':>10}")
    print("-" * (width + 10))
    per_node = {m["node"]: v for k, v in figures.items() if (m := PER_NODE.match(k)) and m["node"] != "both"}
    for key, label, unit in ROWS:
        value = figures.get(key)
        print(f"{label:<{width}}{'n/a' if value is None else f'{value:.3f} {unit}':>10}")
        if key == "register_to_ready_both_s":
            for node, seconds in sorted(per_node.items()):
                print(f"{'  ' + node:<{width}}{f'{seconds:.3f} s':>10}")
    print(f"{'every step passed':<{width}}{'yes' if figures.get('completed') else 'NO':>10}")
    value = figures.get(TARGET_KEY)
    if value is None:
        print(f"\n{TARGET_KEY} missing: no verdict")
        return
    verdict = "meets" if value < TARGET_S else "MISSES"
    print(f"\ntwo-node scenario (steps 1-4) {value:.1f} s ({verdict} the under {TARGET_S:.0f} s target)")


def print_vm_figures() -> None:
    if not VM_FIGURES.exists():
        print(f"\n{VM_FIGURES.relative_to(ROOT)} does not exist yet: run tests/vm (or this script with --vm)")
        return
    written = datetime.fromtimestamp(VM_FIGURES.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    figures = json.loads(VM_FIGURES.read_text())
    width = 56
    print(f"\nLanHub VM figures ({VM_FIGURES.relative_to(ROOT)}, written {written}, QEMU accelerator "
          f"{figures.get('accelerator', '?')})")
    for key, label, unit in VM_ROWS:
        if key in figures:
            print(f"{label:<{width}}{f'{figures[key]:.1f} {unit}':>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-file", action="store_true", help=f"only print {FIGURES.relative_to(ROOT)}")
    parser.add_argument("--timeout", type=float, default=900, help="stop the e2e run after this many seconds")
    parser.add_argument("--vm", action="store_true", help="also run tests/vm (QEMU Debian VMs) and print its figures")
    options = parser.parse_args()
    if not options.from_file:
        started = time.time()
        status = run_e2e(options.timeout + (1800 if options.vm else 0),
                         ("tests/e2e", "tests/vm") if options.vm else ("tests/e2e",))
        fresh = FIGURES.exists() and FIGURES.stat().st_mtime >= started
        if status != 0 or not fresh:
            print(f"\ntests/e2e {'failed' if status else 'passed but wrote no figures'} (exit status {status}); "
                  f"not printing {FIGURES.relative_to(ROOT)} from an earlier run")
            sys.exit(status or 1)
    if not FIGURES.exists():
        print_vm_figures()
        sys.exit(f"{FIGURES.relative_to(ROOT)} does not exist yet: run without --from-file (needs root)")
    written = datetime.fromtimestamp(FIGURES.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    figures = json.loads(FIGURES.read_text())
    print_figures(figures, f"{FIGURES.relative_to(ROOT)}, written {written}")
    print_vm_figures()


if __name__ == "__main__":
    main()
