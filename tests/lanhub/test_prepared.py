"""Queries compiled once (lanhub/prepared.py): the same rows and writes as the ORM's, with new parameters each run."""

import datetime as dt

from django.core.exceptions import ImproperlyConfigured
from django.db.models import F
from django.db.models.signals import pre_save
from django.utils import timezone

from lanhub.prepared import PreparedSelect, PreparedUpdate, insert
from players.models import Device, Invite, Player
from tests.base import BaseTestCase

INVITE_BY_TOKEN = PreparedSelect(
    lambda token: Invite.objects.filter(token=token).values_list("pk", "expires_at", "uses", "lan__name"), token=str)


class PreparedSelectTests(BaseTestCase):
    def test_it_returns_what_the_orm_returns_converted_for_each_new_parameter(self):
        other = Invite.objects.create(lan=self.charlies_lan, expires_at=timezone.now() + dt.timedelta(hours=1))
        for invite in (self.invite, other):
            with self.subTest(invite=invite.pk):
                expected = list(Invite.objects.filter(token=invite.token)
                                .values_list("pk", "expires_at", "uses", "lan__name"))
                rows = INVITE_BY_TOKEN.run(token=invite.token)
                self.assertEqual(rows, expected)
                self.assertIsInstance(rows[0][1], dt.datetime)  # a date, not SQLite's text
                self.assertIsNotNone(rows[0][1].tzinfo)

    def test_a_parameter_is_data_never_sql(self):
        self.assertEqual(INVITE_BY_TOKEN.run(token="x' OR '1'='1"), [])

    def test_it_is_one_query(self):
        INVITE_BY_TOKEN.run(token=self.invite.token)  # compiled
        with self.assertNumQueries(1):
            INVITE_BY_TOKEN.run(token=self.invite.token)

    def test_a_lookup_that_rewrites_its_value_is_refused_when_compiled(self):
        # A pattern lookup escapes and wraps its value ("b_b" becomes "b\\_b%"), so the marker never reaches
        # the SQL as given; a real nickname would then be matched as a pattern.
        by_nickname = PreparedSelect(lambda nick: Player.objects.filter(nickname__startswith=nick).values_list("pk"),
                                     nick=str)
        with self.assertRaises(ImproperlyConfigured):
            by_nickname.run(nick="bob")


class PreparedUpdateTests(BaseTestCase):
    def test_it_updates_the_rows_named_and_counts_them(self):
        count_use = PreparedUpdate(lambda pk: Invite.objects.filter(pk=pk), {"uses": F("uses") + 1}, pk=int)
        self.assertEqual(count_use.run(pk=self.invite.pk), 1)
        self.assertEqual(count_use.run(pk=self.invite.pk + 1000), 0)
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)


class InsertTests(BaseTestCase):
    def test_it_stores_what_save_would_and_gives_the_object_its_key(self):
        inserted = insert(Device(player=self.bob, name="phone", common_name="cn-a", cert_pem="C", key_sealed="K",
                                 serial="ab"))
        saved = Device(player=self.bob, name="laptop", common_name="cn-b", cert_pem="C", key_sealed="K", serial="ab")
        saved.save()
        self.assertIsNotNone(inserted.pk)
        self.assertFalse(inserted._state.adding)
        stored = Device.objects.get(pk=inserted.pk)
        for field in ("player_id", "name", "ref", "common_name", "cert_pem", "key_sealed", "serial", "issued_at",
                      "created_at", "revoked_at"):
            self.assertEqual(getattr(stored, field), getattr(inserted, field), field)
        self.assertEqual(Device.objects.get(pk=saved.pk).name, "laptop")

    def test_a_model_with_a_save_receiver_is_saved_so_the_receiver_runs(self):
        seen = []

        def receiver(sender, instance, **kwargs):
            seen.append(instance.name)

        pre_save.connect(receiver, sender=Device)
        try:
            insert(Device(player=self.bob, name="tablet", common_name="cn-c", cert_pem="C", key_sealed="K",
                          serial="cd"))
        finally:
            pre_save.disconnect(receiver, sender=Device)
        self.assertEqual(seen, ["tablet"])
