"""Walk every URL in the URL configuration (issue 14).

1. Cross-host isolation: every URL that names a host's object, requested by another host, is a 404. The URLs
   come from the URLconf itself, so a new URL is covered without anyone remembering to add it here; a URL whose
   kind of object this test cannot tell fails the test until OBJECT_KINDS learns it.
2. No server errors: hypothesis throws generated path segments and form fields at every URL, anonymous and
   signed in, GET and POST. Django's test client re-raises a view's exception, so a 500 fails the example.
"""

from __future__ import annotations

import os
import re
import string
from urllib.parse import quote

from django.contrib.auth import get_user_model
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from hypothesis.extra.django import TestCase as HypothesisTestCase

from nodes import services as node_services
from nodes.models import Node, NodeState
from players import services as player_services
from players.models import Player
from tests.base import BaseTestCase
from tests.figures import record

CONVERTER = re.compile(r"<(?:(?P<conv>[^>:]+):)?(?P<name>[^>]+)>")
# Which object a host-facing URL names, from the start of its route and its parameter.
OBJECT_KINDS = {("lans/", "slug"): "lan", ("nodes/", "pk"): "node", ("players/", "pk"): "player",
                ("invites/", "pk"): "invite"}
PUBLIC_PARAMS = {"token", "node_ref"}  # token links: the token is the credential, there is no owner to swap
FORM_FIELDS = ["nickname", "rtts", "node", "hours", "max_uses", "note", "name", "slug", "supernet", "pool_prefix",
               "topology_mode", "region", "priority", "public_address", "udp_port", "tcp_port", "ssh_host",
               "ssh_port", "ssh_user", "latitude", "longitude", "country", "udp_pool", "tcp_pool",
               "pinned_upstream", "username", "password", "csrfmiddlewaretoken"]
TRIED = {"requests": 0, "server_errors": 0}


def routes(resolver=None, prefix=""):
    """(route string, name) for every pattern outside the admin, includes flattened."""
    resolver = resolver or get_resolver()
    for pattern in resolver.url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if getattr(pattern, "app_name", None) == "admin":
                continue
            yield from routes(pattern, route)
        elif isinstance(pattern, URLPattern):
            yield route.lstrip("^").rstrip("$"), pattern.name


def fill(route: str, values: dict[str, str]) -> str:
    return "/" + CONVERTER.sub(lambda m: quote(values[m.group("name")], safe=""), route)


class CrossHostTests(BaseTestCase):
    def test_every_url_naming_another_hosts_object_is_not_found(self):
        charlies_node = self.add_node("office-a", lan=self.charlies_lan)
        charlies_invite = player_services.create_invite(lan=self.charlies_lan, created_by=self.charlie)
        charlies_player = player_services.redeem_invite(token=charlies_invite.token, nickname="carol")
        objects = {"lan": self.charlies_lan.slug, "node": str(charlies_node.pk),
                   "player": str(charlies_player.pk), "invite": str(charlies_invite.pk)}
        self.client.force_login(self.alice)
        walked = 0
        for route, name in routes():
            params = [m.group("name") for m in CONVERTER.finditer(route)]
            if not params or set(params) & PUBLIC_PARAMS:
                continue
            values = {}
            for param in params:
                kind = next((k for (start, p), k in OBJECT_KINDS.items() if route.startswith(start) and p == param),
                            None)
                self.assertIsNotNone(kind, f"{route} ({name}): teach OBJECT_KINDS which object {param} names")
                values[param] = objects[kind]
            url = fill(route, values)
            with self.subTest(url=url, name=name):
                statuses = {self.client.get(url).status_code, self.client.post(url).status_code}
                self.assertTrue(statuses <= {404, 405} and 404 in statuses, f"{url}: {statuses}")
            walked += 1
        self.assertGreaterEqual(walked, 10)
        record("cross_host_urls", walked)


ROUTES = sorted(set(routes()))
segment = st.one_of(st.text(max_size=40), st.text(alphabet=string.ascii_letters + string.digits + "_-", max_size=40),
                    st.integers(min_value=-2**70, max_value=2**70).map(str), st.sampled_from(["", ".", "..", "%", "²"]))
form_value = st.one_of(st.text(max_size=200), st.integers().map(str), st.sampled_from(
    ["", "0", "-1", "1e309", "NaN", "dead:beef", "10.0.0.0/8", "bob\n", "{}", "[]", '{"²": 1}', "[" * 1000]))


class NoServerErrorTests(BaseTestCase, HypothesisTestCase):
    @classmethod
    def setUpTestData(cls):
        super().setUpTestData()
        cls.node = node_services.create_node(lan=cls.lan, name="hangzhou", region="asia/cn/east",
                                             public_address="203.0.113.10", ssh_host="203.0.113.10")
        Node.objects.filter(pk=cls.node.pk).update(state=NodeState.READY)
        cls.root = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")

    @hsettings(max_examples=int(os.environ.get("LANHUB_FUZZ_EXAMPLES", "150")), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(data=st.data())
    def test_no_generated_input_to_any_url_is_a_server_error(self, data):
        route, name = data.draw(st.sampled_from(ROUTES), label="route")
        who = data.draw(st.sampled_from(["anonymous", "host", "other host"]), label="who")
        player = Player.objects.filter(pk=self.bob.pk).first()
        values = {}
        for m in CONVERTER.finditer(route):
            param = m.group("name")
            known = {"token": [player.token, self.invite.token], "slug": [self.lan.slug],
                     "pk": [str(self.node.pk), str(self.bob.pk), str(self.invite.pk)],
                     "node_ref": [self.node.name, str(self.node.pk)]}.get(param, [])
            values[param] = data.draw(st.one_of(st.sampled_from(known), segment) if known else segment, label=param)
        url = fill(route, values)
        fields = data.draw(st.lists(st.sampled_from(FORM_FIELDS), max_size=8, unique=True), label="fields")
        body = {f: data.draw(form_value, label=f) for f in fields}
        method = data.draw(st.sampled_from(["get", "post"]), label="method")
        self.client.logout()
        if who != "anonymous":
            self.client.force_login(self.alice if who == "host" else self.charlie)
        # A view's exception propagates out of the test client: a 500 fails here with the input that caused it.
        response = getattr(self.client, method)(url, body)
        TRIED["requests"] += 1
        if name == "healthz" and response.status_code == 503:
            return  # its honest answer while no worker runs (this suite starts none): not an error of the request
        self.assertLess(response.status_code, 500, f"{method.upper()} {url} {body}")

    @classmethod
    def tearDownClass(cls):
        record("generated_requests", TRIED["requests"])
        record("server_errors", TRIED["server_errors"])
        super().tearDownClass()
