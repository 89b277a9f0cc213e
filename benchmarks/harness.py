"""What the web benchmarks share: a throwaway LanHub served by gunicorn on loopback, timed GETs, and JSON lines.

Every benchmark prints one JSON object per figure, ``{"what", "lanhub", "floor", "ratio", "unit", "target",
"meets"}``, where ``floor`` is the reference measured in the same run on the same machine (a static file of the same
size from the same gunicorn, easy-rsa, an empty history) and ``ratio`` is ``lanhub / floor``.

The environment is production-like and throwaway: DEBUG=False with random SECRET_KEY and LANHUB_KEY, a SQLite file
in a fresh temporary directory (or ``--database-url``, a database of your own), STATIC_ROOT in that directory (so
floor files can be put there for whitenoise), and a Celery queue and cache prefix of the run's own, purged at the
end. Only 127.0.0.1 is ever contacted. Every loop stops after a count or a time limit.
"""

from __future__ import annotations

import http.client
import json
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

HOST = "127.0.0.1"  # the only address the benchmarks talk to
MAX_REQUESTS = 20_000  # hard caps, whatever the command line says
MAX_SECONDS = 300


def emit(what: str, lanhub: float, floor: float, *, unit: str, target: str, meets: bool, **extra) -> dict:
    """Print one figure as a JSON line and return it."""
    line = {"what": what, "lanhub": round(lanhub, 4), "floor": round(floor, 4),
            "ratio": round(lanhub / floor, 4) if floor else None, "unit": unit, "target": target,
            "meets": bool(meets), **extra}
    print(json.dumps(line), flush=True)
    return line


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Site:
    """A throwaway LanHub: settings in this process (to build the fixture) and a gunicorn serving them."""

    def __init__(self, *, database_url: str | None = None, workers: int = 2, threads: int = 128):
        self.tmp = Path(tempfile.mkdtemp(prefix="lanhub-bench-"))
        self.port = free_port()
        self.workers, self.threads = workers, threads
        run = f"lanhub-bench-{os.getpid()}"
        (self.tmp / "static").mkdir()
        self.env = {
            "DJANGO_SETTINGS_MODULE": "lanhub.settings",
            "DATABASE_URL": database_url or f"sqlite:///{self.tmp / 'bench.sqlite3'}",
            "DEBUG": "False",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "LANHUB_KEY": secrets.token_urlsafe(48),
            "ALLOWED_HOSTS": HOST,
            "SITE_URL": f"http://{HOST}:{self.port}",
            "STATIC_ROOT": str(self.tmp / "static"),
            "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "CACHE_PREFIX": run,
            "CELERY_QUEUE": run,
            "LOG_LEVEL": "WARNING",
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Site":
        os.environ.update(self.env)  # the fixture is built with the settings gunicorn will read
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.print_log()
        self.stop()
        try:
            import redis

            from lanhub.celery import app

            app.control.purge()  # only this run's queue: CELERY_QUEUE is lanhub-bench-<pid>
            # Only this run's cache keys (cache.clear() would flush the whole Redis database others use too).
            client = redis.Redis.from_url(self.env["REDIS_URL"])
            keys = list(client.scan_iter(match=f"{self.env['CACHE_PREFIX']}:*", count=1000))[:100_000]
            if keys:
                client.delete(*keys)
        except Exception as error:  # noqa: BLE001 - clean-up must not hide the figures
            print(f"warning: clean-up of the bench queue {self.env['CELERY_QUEUE']}: {error}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def static_file(self, name: str, size: int) -> str:
        """A file of `size` bytes for whitenoise to serve (call before start()); returns its URL path."""
        (self.tmp / "static" / name).write_bytes(os.urandom(size // 2).hex().encode()[:size].ljust(size, b"0"))
        return f"/static/{name}"

    def start(self) -> None:
        from django.db import connections

        connections.close_all()  # leave the database to gunicorn while it runs
        log = open(self.tmp / "gunicorn.log", "wb")
        try:
            self.proc = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "gunicorn"), "lanhub.wsgi", "--bind", f"{HOST}:{self.port}",
                 "--workers", str(self.workers), "--threads", str(self.threads), "--graceful-timeout", "5",
                 "--log-level", "warning"],
                cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with status {self.proc.returncode} before answering")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to the master: graceful stop of its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def pids(self) -> list[int]:
        """gunicorn's master and workers (for CPU accounting)."""
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        kids = [int(p) for p in children.read_text().split()] if children.exists() else []
        return [self.proc.pid, *kids]

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed so far by gunicorn's master and workers."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return total / tick

    def print_log(self) -> None:
        log = self.tmp / "gunicorn.log"
        if log.exists() and log.stat().st_size:
            print("gunicorn log (last lines):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]),
                  file=sys.stderr)


def timed_gets(port: int, path: str, *, count: int, seconds: float, headers: dict | None = None,
               expect: bytes | None = None, status: int = 200) -> tuple[list[float], int]:
    """`count` sequential keep-alive GETs (stopping after `seconds`). Returns (latencies in s, response size).
    Raises if a response has another status or lacks `expect`: a fast error page must not pass for a figure."""
    count = max(1, min(count, MAX_REQUESTS))
    deadline = time.monotonic() + min(seconds, MAX_SECONDS)
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    latencies, size = [], 0
    try:
        for _ in range(count):
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            latencies.append(time.perf_counter() - began)
            if response.status != status or (expect is not None and expect not in body):
                raise RuntimeError(f"GET {path}: HTTP {response.status}, {body[:200]!r}")
            size = len(body)
    finally:
        conn.close()
    return latencies, size


def p50_pair(port: int, path: str, floor_path: str, *, count: int, seconds: float, headers: dict | None = None,
             expect: bytes | None = None, rounds: int = 3) -> tuple[float, float, int]:
    """p50 (ms) of `path` and of `floor_path`, interleaved in `rounds` so both see the same machine load.
    Returns (lanhub p50, floor p50, response size)."""
    ours, floor, size = [], [], 0
    share = max(1, count // rounds)
    for _ in range(rounds):
        lat, size = timed_gets(port, path, count=share, seconds=seconds / rounds, headers=headers, expect=expect)
        ours += lat
        lat, _ = timed_gets(port, floor_path, count=share, seconds=seconds / rounds)
        floor += lat
    return percentile(ours, 50) * 1000, percentile(floor, 50) * 1000, size


def in_threads(target, args_list: list[tuple]) -> None:
    threads = [threading.Thread(target=target, args=args, daemon=True) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=MAX_SECONDS + 30)
