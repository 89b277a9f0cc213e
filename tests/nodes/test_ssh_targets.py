"""The worker is not a port scanner (issue 14, item 6): it refuses SSH targets on the portal's own machine and
link-local addresses, and a closed port, a silent one and a non-SSH service all fail with the same words."""

import socket
import threading

from django.test import override_settings

from nodes.ssh import ProvisioningError, open_connection
from tests.base import BaseTestCase


def own_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


class Listener:
    """A TCP port on 127.0.0.1 that answers like a web server (or not at all), for as long as the test runs."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.reply is not None:
                conn.sendall(self.reply)
                conn.close()

    def close(self):
        self.sock.close()


class SshTargetTests(BaseTestCase):
    def error(self, host, port=22, timeout=2):
        node = self.add_node(f"n{abs(hash((host, port))) % 10**6}", ssh_host=host, ssh_port=port)
        with self.assertRaises(ProvisioningError) as caught:
            open_connection(node, pin=lambda line: None, timeout=timeout)
        return caught.exception

    @override_settings(LANHUB_SSH_ALLOW_LOCAL_TARGETS=False)
    def test_loopback_link_local_and_own_addresses_are_refused_without_connecting(self):
        targets = ["127.0.0.1", "169.254.169.254", "::1"]
        if own_address():
            targets.append(own_address())
        for host in targets:
            with self.subTest(host=host):
                exc = self.error(host)
                self.assertTrue(exc.permanent)
                self.assertIn("LanHub does not connect to", exc.message)

    @override_settings(LANHUB_SSH_ALLOW_LOCAL_TARGETS=True)
    def test_the_lab_setting_allows_local_targets(self):
        exc = self.error("127.0.0.1", port=Listener(None).port, timeout=1)
        self.assertNotIn("LanHub does not connect to", exc.message)

    @override_settings(LANHUB_SSH_ALLOW_LOCAL_TARGETS=True)
    def test_closed_silent_and_non_ssh_ports_fail_with_the_same_message(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        web, silent = Listener(b"HTTP/1.0 400 Bad Request\r\n\r\n"), Listener(None)
        try:
            messages = {
                "closed": self.error("127.0.0.1", closed_port, timeout=1).message.replace(str(closed_port), "PORT"),
                "web": self.error("127.0.0.1", web.port, timeout=1).message.replace(str(web.port), "PORT"),
                "silent": self.error("127.0.0.1", silent.port, timeout=1).message.replace(str(silent.port), "PORT"),
            }
        finally:
            web.close()
            silent.close()
        self.assertEqual(len(set(messages.values())), 1, messages)
        self.assertIn("nothing answered there as an SSH server", messages["closed"])
