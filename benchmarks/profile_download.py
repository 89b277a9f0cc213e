"""Repeat downloads of an existing profile through the real view, served by gunicorn on loopback.

    cd /work/main && .venv/bin/python benchmarks/profile_download.py [--requests 500] [--seconds 60]
        [--threads 4] [--workers 2] [--gunicorn-threads 4]

Set-up, all throwaway: a SQLite file in a fresh temporary directory, migrated; a host user, a LAN, two nodes marked
ready, an invite and one redeemed player ("bench"). Production-like settings: DEBUG=False with random SECRET_KEY and
LANHUB_KEY, ALLOWED_HOSTS=127.0.0.1. gunicorn is started the way the Procfile starts it (2 workers x 4 threads, the
gthread worker, which keeps connections alive; `--gunicorn-threads 1` gives the plain sync worker, which closes
the connection after every response). Creating a node queues sync tasks; they go to a queue of this run's own
name (CELERY_QUEUE), so no worker of another checkout picks them up, and that queue is purged at the end.

Measured from this process with http.client on 127.0.0.1, after a warm-up: N sequential GETs of
/me/<player token>/profile/<node name>.ovpn (p50/p90/p99 latency and requests per second), then the same number
spread over a few client threads (throughput). Every response must be a 200 holding "<cert>"; failures are counted
and shown. Target: p50 under 10 ms (sequential). Each phase stops after N requests or `--seconds`, whichever
comes first; gunicorn is stopped and the temporary directory removed in every case.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"  # the only address this script ever talks to
TARGET_P50_MS = 10.0
MAX_REQUESTS = 20_000  # hard caps, whatever the command line says
MAX_SECONDS = 300
MAX_CLIENT_THREADS = 16
WARMUP = 30


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def bench_environment(tmp: Path, port: int) -> dict[str, str]:
    run = f"lanhub-bench-{os.getpid()}"
    return {
        "DJANGO_SETTINGS_MODULE": "lanhub.settings",
        "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
        "DEBUG": "False",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "LANHUB_KEY": secrets.token_urlsafe(48),
        "ALLOWED_HOSTS": HOST,
        "SITE_URL": f"http://{HOST}:{port}",
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "CACHE_PREFIX": run,
        "CELERY_QUEUE": run,
        "LOG_LEVEL": "WARNING",
    }


def build_fixture() -> tuple[str, str]:
    """Migrate the throwaway DB and create host, LAN, two ready nodes, invite and player. Returns (token, node)."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections

    from nodes import services as node_services
    from nodes.models import Node, NodeState
    from players import services as player_services

    call_command("migrate", verbosity=0, interactive=False)
    host = get_user_model().objects.create_user("bench-host", password=secrets.token_urlsafe(16))
    lan = node_services.create_lan(owner=host, name="Bench LAN", slug="bench")
    # Documentation addresses (RFC 5737): nothing in this script connects to them; the queued syncs are purged.
    for name, region, address in (("hangzhou", "asia/cn/east", "203.0.113.10"),
                                  ("hongkong", "asia/hk", "203.0.113.11")):
        node_services.create_node(lan=lan, name=name, region=region, public_address=address, ssh_host=address)
    Node.objects.filter(lan=lan).update(state=NodeState.READY, healthy=True)
    invite = player_services.create_invite(lan=lan, created_by=host, note="bench")
    player = player_services.redeem_invite(token=invite.token, nickname="bench")
    connections.close_all()  # leave the SQLite file to gunicorn
    return player.token, "hangzhou"


def start_gunicorn(env: dict[str, str], port: int, workers: int, threads: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "gunicorn"), "lanhub.wsgi", "--bind", f"{HOST}:{port}",
             "--workers", str(workers), "--threads", str(threads), "--log-level", "warning"],
            cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )
    finally:
        log.close()  # the child holds its own descriptor


def wait_until_up(proc: subprocess.Popen, port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer on {HOST}:{port} within {timeout:.0f} s")


def stop_gunicorn(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM to the master: graceful stop of its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Result:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.closed_by_server = 0
        self.size = 0
        self.lock = threading.Lock()


def fetch_loop(port: int, path: str, count: int, deadline: float, result: Result) -> None:
    """`count` GETs on one keep-alive connection (http.client reopens it if the server closed it)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    latencies, failures, closed = [], [], 0
    try:
        for _ in range(count):
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                latencies.append(time.perf_counter() - began)
                failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            latencies.append(time.perf_counter() - began)
            closed += response.will_close
            if response.status != 200 or b"<cert>" not in body:
                failures.append(f"HTTP {response.status}: {body[:120]!r}")
            else:
                result.size = len(body)
    finally:
        conn.close()
    with result.lock:
        result.latencies += latencies
        result.failures += failures
        result.closed_by_server += closed


def run_phase(port: int, path: str, total: int, threads: int, seconds: float) -> tuple[Result, float]:
    result = Result()
    deadline = time.monotonic() + seconds
    shares = [total // threads + (1 if i < total % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=fetch_loop, args=(port, path, n, deadline, result), daemon=True)
               for n in shares]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 30)  # each request also has a 10 s socket timeout
    return result, time.perf_counter() - began


def report(label: str, result: Result, wall: float) -> float:
    done = sorted(result.latencies)
    p50, p90, p99 = (percentile(done, q) * 1000 for q in (50, 90, 99))
    print(f"{label:<26}{len(done):>6} req {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} ms {len(done) / wall:>9.0f} req/s"
          f"   failures {len(result.failures)}, server-closed connections {result.closed_by_server}")
    for line in result.failures[:5]:
        print(f"    failure: {line}")
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="GETs per phase (default 500)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per phase (default 60)")
    parser.add_argument("--threads", type=int, default=4, help="client threads in the concurrent phase (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2, as in the Procfile)")
    parser.add_argument("--gunicorn-threads", type=int, default=4,
                        help="threads per gunicorn worker (default 4, as in the Procfile; 1 = sync worker)")
    options = parser.parse_args()
    total = max(1, min(options.requests, MAX_REQUESTS))
    seconds = max(1.0, min(options.seconds, MAX_SECONDS))
    threads = max(1, min(options.threads, MAX_CLIENT_THREADS))

    tmp = Path(tempfile.mkdtemp(prefix="lanhub-bench-"))
    port = free_port()
    env = bench_environment(tmp, port)
    os.environ.update(env)  # this process builds the fixture with the same settings gunicorn will read
    proc = None
    try:
        token, node = build_fixture()
        path = f"/me/{token}/profile/{node}.ovpn"
        proc = start_gunicorn(env, port, options.workers, options.gunicorn_threads, tmp / "gunicorn.log")
        wait_until_up(proc, port, path)
        run_phase(port, path, WARMUP * max(options.workers, threads), threads, 30)  # every worker imports & connects

        import django

        print(f"profile download via gunicorn on {HOST}:{port}: {options.workers} workers x "
              f"{options.gunicorn_threads} threads, DEBUG=False, SQLite in {tmp}, Django {django.get_version()}, "
              f"Python {sys.version.split()[0]}")
        print(f"GET /me/<token>/profile/{node}.ovpn (2 ready nodes); warm-up done; limit {seconds:.0f} s per phase")
        print(f"{'phase':<26}{'done':>10} {'p50':>8} {'p90':>8} {'p99':>8}    {'throughput':>13}")
        sequential, wall = run_phase(port, path, total, 1, seconds)
        p50 = report("sequential, 1 connection", sequential, wall)
        concurrent, wall = run_phase(port, path, total, threads, seconds)
        report(f"concurrent, {threads} connections", concurrent, wall)
        print(f"profile size {sequential.size or concurrent.size} bytes")
        verdict = "meets" if p50 < TARGET_P50_MS and not sequential.failures else "MISSES"
        print(f"sequential p50 {p50:.2f} ms ({verdict} the p50 < {TARGET_P50_MS:.0f} ms target)")
    except BaseException:
        log = tmp / "gunicorn.log"
        if log.exists() and log.stat().st_size:
            print("gunicorn log (last lines):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        if proc is not None:
            stop_gunicorn(proc)
        try:
            from lanhub.celery import app

            app.control.purge()  # only this run's queue: CELERY_QUEUE is lanhub-bench-<pid>
        except Exception as exc:  # noqa: BLE001 - clean-up must not hide the figures
            print(f"warning: could not purge the bench queue {env['CELERY_QUEUE']}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
