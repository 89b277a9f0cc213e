"""The invite and player services on their own: the checks hold even when a view did not make them first."""

import datetime as dt

from django.utils import timezone

from players import services
from players.models import Invite, Player
from tests.base import BaseTestCase


class RedeemInviteTests(BaseTestCase):
    def assertRefused(self, reason):
        players, uses = Player.objects.count(), Invite.objects.get(pk=self.invite.pk).uses
        with self.assertRaises(services.InviteUnusable) as caught:
            services.redeem_invite(token=self.invite.token, nickname="erin")
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(Player.objects.count(), players)
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, uses)

    def test_an_invite_that_expired_after_the_page_loaded_is_refused_by_the_service(self):
        Invite.objects.filter(pk=self.invite.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
        self.assertRefused("expired")

    def test_a_used_up_invite_is_refused_by_the_service(self):
        Invite.objects.filter(pk=self.invite.pk).update(max_uses=1)  # bob used it
        self.assertRefused("used_up")

    def test_a_revoked_invite_is_refused_by_the_service(self):
        services.revoke_invite(self.invite)
        self.assertRefused("revoked")

    def test_redeeming_counts_a_use(self):  # already covered through the view; here for the service alone
        services.redeem_invite(token=self.invite.token, nickname="dave")
        self.assertEqual(Invite.objects.get(pk=self.invite.pk).uses, 2)


