"""Hold every ready node's OpenVPN management interfaces and record who connects and leaves (nodes/watcher.py)."""

import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from nodes.watcher import Shard


class Command(BaseCommand):
    help = ("Run the session watcher: every ready node's OpenVPN servers are held open over SSH and who connects "
            "and leaves becomes VpnSession rows as it happens. --processes N splits the nodes over N processes (by "
            "node id). Runs until interrupted; needs Redis (syncs and polls ask it to step aside) and SSH access "
            "to the nodes.")

    def add_arguments(self, parser):
        parser.add_argument("--processes", type=int, default=settings.LANHUB_WATCHER_PROCESSES,
                            help="worker processes, each holding the nodes whose id modulo N is its index")
        parser.add_argument("--shard", type=int, default=None, help="(internal) run one shard in this process")

    def handle(self, *args, processes: int, shard: int | None, **options):
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        if shard is not None:
            if not 0 <= shard < processes:
                raise CommandError(f"--shard must be between 0 and {processes - 1}")
            self.stdout.write(f"watching shard {shard} of {processes}")
            watcher = Shard(shard, processes)
            signal.signal(signal.SIGTERM, lambda *_: watcher.stopping.set())
            try:
                watcher.run()
            except KeyboardInterrupt:
                watcher.stop()
            return
        children = [subprocess.Popen([sys.executable, sys.argv[0], "watch_sessions", "--processes", str(processes),
                                      "--shard", str(index)]) for index in range(processes)]
        self.stdout.write(f"session watcher: {processes} process(es), pids {', '.join(str(p.pid) for p in children)}")
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"] and all(child.poll() is None for child in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
        if failed and not stop["now"]:
            raise CommandError(f"a watcher process ended with status {failed[0]}")
