"""Who is online: the watcher's reading of OpenVPN's real-time log, and the session rows it writes."""

from datetime import datetime, timezone

import secrets

import redis
from django.conf import settings
from django.test import SimpleTestCase, override_settings

from nodes import presence
from nodes.models import VpnSession
from nodes.openvpn_mgmt import ClientEvent, ClientRow, NotificationReader, parse_log_line
from tests.base import BaseTestCase

CN = "player-bob-a1b2c3"


class LogLineTests(SimpleTestCase):
    def test_a_push_reply_sent_to_a_client_means_it_joined(self):
        line = f">LOG:1764640000,,{CN}/203.0.113.20:40001 SENT CONTROL [{CN}]: 'PUSH_REPLY,route-gateway 10.0.0.1'"
        self.assertEqual(parse_log_line(line), ClientEvent("joined", CN, "203.0.113.20:40001"))

    def test_an_exit_notice_is_a_bye_and_an_ended_instance_is_an_end(self):
        self.assertEqual(parse_log_line(f">LOG:1764640000,,{CN}/203.0.113.20:40001 CC-EEN exit message received by peer"),
                         ClientEvent("bye", CN, "203.0.113.20:40001"))
        line = f">LOG:1764640000,,{CN}/203.0.113.20:40001 SIGTERM[soft,delayed-exit] received, client-instance exiting"
        self.assertEqual(parse_log_line(line).kind, "ended")
        self.assertEqual(parse_log_line(f">LOG:1764640000,,{CN}/203.0.113.21:50000 Connection reset, restarting [0]").kind,
                         "ended")

    def test_lines_about_no_client_or_other_things_are_ignored(self):
        for line in (">LOG:1764640000,,MANAGEMENT: Client connected from [AF_INET]127.0.0.1:7505",
                     f">LOG:1764640000,,{CN}/203.0.113.20:40001 VERIFY OK: depth=0, CN={CN}",
                     ">INFO:OpenVPN Management Interface Version 5", "SUCCESS: real-time log notification set to ON",
                     ">LOG:garbage"):
            self.assertIsNone(parse_log_line(line), line)


# What OpenVPN 2.6.14 sent on a held interface when a player reconnected within the 5-second delayed exit of their
# previous session (abridged: CLIENT:ENV lines that name nothing we read are left out).
RECONNECT = f""">LOG:1796192514,I,198.51.100.10:44989 [{CN}] Peer Connection Initiated with [AF_INET]198.51.100.10:44989
>LOG:1796192514,,MULTI: new connection by client '{CN}' will cause previous active sessions by this client to be dropped.
>LOG:1796192514,I,MULTI_sva: pool returned IPv4=10.0.1.1, IPv6=(Not enabled)
>LOG:1796192514,,MULTI: Learn: 10.0.1.1 -> {CN}/198.51.100.10:44989
>LOG:1796192514,,SENT CONTROL [{CN}]: 'PUSH_REPLY,route 10.0.0.0 255.0.0.0,route-gateway 10.0.0.1,topology subnet'
>CLIENT:ESTABLISHED,1
>CLIENT:ENV,n_clients=1
>CLIENT:ENV,ifconfig_pool_remote_ip=10.0.1.1
>CLIENT:ENV,trusted_port=44989
>CLIENT:ENV,trusted_ip=198.51.100.10
>CLIENT:ENV,common_name={CN}
>CLIENT:ENV,IV_VER=2.6.14
>CLIENT:ENV,END
>LOG:1796192515,,{CN}/198.51.100.10:44989 Data Channel: cipher 'AES-256-GCM', peer-id: 0""".splitlines()


class NotificationReaderTests(SimpleTestCase):
    def test_a_reconnect_whose_log_lines_lost_their_client_prefix_is_still_a_join(self):
        # The PUSH_REPLY line has no "<cn>/<address>" prefix here: the log alone misses this player.
        self.assertEqual([e for e in map(parse_log_line, RECONNECT) if e], [])
        reader = NotificationReader()
        self.assertEqual([e for e in map(reader.feed, RECONNECT) if e],
                         [ClientEvent("joined", CN, "198.51.100.10:44989")])

    def test_client_blocks_are_read_whole_and_log_lines_between_them_still_count(self):
        reader = NotificationReader()
        lines = [">CLIENT:ESTABLISHED,7", ">CLIENT:ENV,common_name=bad name", ">CLIENT:ENV,trusted_ip=203.0.113.5",
                 ">CLIENT:ENV,END",  # not a common name LanHub issues: ignored
                 ">CLIENT:ENV,common_name=stray", ">CLIENT:ENV,END",  # ENV outside a block: ignored
                 ">CLIENT:ESTABLISHED,8", ">CLIENT:ENV,common_name=dev-1", ">CLIENT:ENV,trusted_ip6=2001:db8::5",
                 ">CLIENT:ENV,END",
                 f">LOG:1764640000,,{CN}/203.0.113.20:40001 CC-EEN exit message received by peer"]
        self.assertEqual([e for e in map(reader.feed, lines) if e],
                         [ClientEvent("joined", "dev-1", "2001:db8::5"), ClientEvent("bye", CN, "203.0.113.20:40001")])


def row(cn, real, instance="server/lanhub-udp", vpn="10.0.1.2"):
    return ClientRow(common_name=cn, real_address=real, vpn_address=vpn, bytes_in=0, bytes_out=0,
                     connected_since=datetime(2026, 12, 1, tzinfo=timezone.utc), instance=instance)


class PresenceTests(BaseTestCase):
    def setUp(self):
        self.node = self.add_node("hangzhou")

    def test_an_instances_list_replaces_only_that_instances_sessions_and_names_the_player(self):
        presence.replace_instance(self.node, "server/lanhub-tcp", [row("someone", "198.51.100.9:1", "server/lanhub-tcp")])
        presence.replace_instance(self.node, "server/lanhub-udp", [row(self.bob.common_name, "203.0.113.20:40001")])
        sessions = {(s.instance, s.common_name, s.player_id) for s in VpnSession.objects.filter(node=self.node)}
        self.assertEqual(sessions, {("server/lanhub-tcp", "someone", None),
                                    ("server/lanhub-udp", self.bob.common_name, self.bob.pk)})
        self.bob.refresh_from_db()
        self.assertIsNotNone(self.bob.last_seen_at)

    def test_a_client_that_left_loses_only_the_session_from_its_address(self):
        presence.replace_instance(self.node, "server/lanhub-udp", [row(CN, "203.0.113.20:40001"),
                                                                   row(CN, "203.0.113.30:40002", vpn="10.0.1.3")])
        presence.client_left(self.node, "server/lanhub-udp", CN, "203.0.113.20:40001")
        self.assertEqual(list(VpnSession.objects.values_list("real_address", flat=True)), ["203.0.113.30:40002"])


class HeldNodesArePolledSlowlyTests(SimpleTestCase):
    """The status poll reads a node the watcher holds once per LANHUB_HELD_POLL_INTERVAL, every other node each round."""

    def setUp(self):
        caches = {**settings.CACHES, "default": {**settings.CACHES["default"], "KEY_PREFIX": secrets.token_hex(6)}}
        self.enterContext(override_settings(CACHES=caches, LANHUB_STATUS_INTERVAL=60, LANHUB_HELD_POLL_INTERVAL=600))
        self.redis = redis.Redis.from_url(settings.REDIS_URL)
        self.addCleanup(self.redis.delete, presence.held_key())

    def test_a_held_node_is_polled_once_in_ten_rounds_and_a_stale_mark_counts_for_nothing(self):
        rounds = []
        for i in range(10):
            now = 1_800_000_000.0 + 60 * i  # the watcher marks what it holds every few seconds
            self.redis.hset(presence.held_key(), mapping={5: now - 5, 6: now - presence.HELD_FRESH - 1})
            rounds.append(presence.due_for_poll([5, 6, 7], now=now))
        self.assertEqual(sum(5 in ids for ids in rounds), 1)
        self.assertTrue(all({6, 7} <= set(ids) for ids in rounds))

    def test_without_marks_every_node_is_polled(self):
        self.assertEqual(presence.due_for_poll([1, 2, 3], now=1_800_000_000.0), [1, 2, 3])


class ManyHeldNodesTests(SimpleTestCase):
    def test_the_wait_on_held_channels_works_past_selects_1024_descriptor_limit(self):
        import os
        import socket

        from nodes import watcher

        self.assertGreaterEqual(watcher.raise_file_limit(), 2048)  # what a shard does when it starts
        fillers = [os.pipe() for _ in range(520)]  # a shard holding a few hundred nodes has this many open
        try:
            ours, theirs = socket.socketpair()
            self.assertGreater(ours.fileno(), 1024)
            self.assertEqual(watcher._readable([ours], 0.05), [])
            theirs.send(b">LOG:...\n")
            self.assertEqual(watcher._readable([ours], 1.0), [ours])
            ours.close()
            theirs.close()
        finally:
            for read, write in fillers:
                os.close(read)
                os.close(write)
