"""Which OpenVPN instances a changed file restarts: only those that read it, and only when they must."""

from django.test import SimpleTestCase

from nodes.files import PkiFile, instances_to_restart
from nodes.render import TCP_INSTANCE, UDP_INSTANCE, RenderedFile


class InstancesToRestartTests(SimpleTestCase):
    LINK = "client/lanhub-link-hangzhou"
    UDP_CONF = "/etc/openvpn/server/lanhub-udp.conf"
    CCD = "/etc/openvpn/server/ccd/link-hongkong"
    PKI = "/etc/openvpn/lanhub/pki"

    def files(self):
        return {
            self.UDP_CONF: RenderedFile(self.UDP_CONF, "udp", instance=UDP_INSTANCE),
            self.CCD: RenderedFile(self.CCD, "ccd", instance=UDP_INSTANCE),
            f"{self.PKI}/ca.crt": PkiFile(f"{self.PKI}/ca.crt", "ca", restarts="all"),
            f"{self.PKI}/node.key": PkiFile(f"{self.PKI}/node.key", "key", 0o600, restarts="servers"),
            f"{self.PKI}/link.crt": PkiFile(f"{self.PKI}/link.crt", "link", restarts="links"),
            f"{self.PKI}/revoked/4242": PkiFile(f"{self.PKI}/revoked/4242", ""),
        }

    def test_each_changed_file_restarts_exactly_the_instances_that_read_it(self):
        wanted = {UDP_INSTANCE, TCP_INSTANCE, self.LINK}
        cases = [
            ([self.UDP_CONF], {UDP_INSTANCE}),
            ([self.CCD], set()),  # read at connect time: the link reconnects instead (reconnect_for)
            ([f"{self.PKI}/revoked/4242"], set()),  # OpenVPN looks the file up at each handshake
            ([f"{self.PKI}/node.key"], {UDP_INSTANCE, TCP_INSTANCE}),
            ([f"{self.PKI}/link.crt"], {self.LINK}),
            ([f"{self.PKI}/ca.crt"], wanted),
            (["/etc/openvpn/server/lanhub-udp.conf", "/not/a/managed/file"], {UDP_INSTANCE}),
        ]
        for changed, expected in cases:
            with self.subTest(changed=changed):
                self.assertEqual(instances_to_restart(changed, self.files(), wanted), expected)

    def test_an_instance_that_is_not_wanted_is_never_restarted(self):
        self.assertEqual(instances_to_restart([f"{self.PKI}/ca.crt"], self.files(), {TCP_INSTANCE}), {TCP_INSTANCE})
