"""A real `manage.py watch_sessions` process for the end-to-end tests, in its own process group, its log kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from django.conf import settings


def database_url() -> str:
    """The test database, as the watcher process must see it."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}:{db.get('PASSWORD') or ''}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class WatcherProcess:
    """`manage.py watch_sessions --processes 1` in its own process group, its log collected."""

    def __init__(self):
        self.lines: list[str] = []
        env = {**os.environ, "DATABASE_URL": database_url(), "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "watch_sessions", "--processes", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def watching(self, name: str, count: int = 1) -> bool:
        return sum(f"watching {name} server/lanhub-udp" in line for line in self.lines) >= count

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: the parent and its shard process
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
