"""Devices: each of a player's devices gets its own certificate. A player's current certificate becomes their
first device (same common name, serial and key, so the profiles they already downloaded keep working)."""

import secrets

import django.core.validators
import django.db.models.deletion
import django.db.models.functions.text
import django.utils.timezone
import players.models
from django.db import migrations, models


FIRST_DEVICE_NAME = "first device"  # players.models.FIRST_DEVICE_NAME when this migration was written


def certificates_to_devices(apps, schema_editor):
    Player, Device = apps.get_model("players", "Player"), apps.get_model("players", "Device")
    devices = [
        Device(player_id=p.pk, name=FIRST_DEVICE_NAME, ref=secrets.token_urlsafe(6), common_name=p.common_name,
               cert_pem=p.cert_pem, key_sealed=p.key_sealed, serial=p.serial, issued_at=p.issued_at or p.created_at,
               created_at=p.created_at, revoked_at=p.revoked_at)
        for p in Player.objects.exclude(cert_pem="").iterator()
    ]
    Device.objects.bulk_create(devices, batch_size=500)


def first_devices_to_players(apps, schema_editor):
    """Undo: a player keeps the certificate of their first device still in use (else of their first device)."""
    Player, Device = apps.get_model("players", "Player"), apps.get_model("players", "Device")
    for player in Player.objects.iterator():
        device = (Device.objects.filter(player_id=player.pk).order_by(models.F("revoked_at").asc(nulls_first=True), "created_at", "pk").first())
        if device is not None:
            Player.objects.filter(pk=player.pk).update(
                common_name=device.common_name, cert_pem=device.cert_pem, key_sealed=device.key_sealed,
                serial=device.serial, issued_at=device.issued_at)


class Migration(migrations.Migration):

    dependencies = [
        ('players', '0002_nickname_validator_ends_at_z'),
    ]

    operations = [
        migrations.CreateModel(
            name='Device',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=32, validators=[django.core.validators.RegexValidator('\\A[^\\x00-\\x1f\\x7f]{1,32}\\Z', 'Name the device in 1–32 characters, e.g. “laptop” or “phone”.')])),
                ('ref', models.CharField(default=players.models.new_device_ref, editable=False, max_length=16, unique=True)),
                ('common_name', models.CharField(db_index=True, editable=False, max_length=64)),
                ('cert_pem', models.TextField(editable=False)),
                ('key_sealed', models.TextField(editable=False)),
                ('serial', models.CharField(editable=False, max_length=64)),
                ('issued_at', models.DateTimeField(default=django.utils.timezone.now, editable=False)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now, editable=False)),
                ('revoked_at', models.DateTimeField(blank=True, editable=False, null=True)),
                ('player', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='devices', to='players.player')),
            ],
            options={
                'ordering': ('created_at', 'pk'),
                'constraints': [models.UniqueConstraint(django.db.models.functions.text.Lower('name'), models.F('player'), condition=models.Q(('revoked_at__isnull', True)), name='device_unique_active_name_per_player')],
            },
        ),
        migrations.RunPython(certificates_to_devices, first_devices_to_players),
        migrations.RemoveField(
            model_name='player',
            name='cert_pem',
        ),
        migrations.RemoveField(
            model_name='player',
            name='common_name',
        ),
        migrations.RemoveField(
            model_name='player',
            name='issued_at',
        ),
        migrations.RemoveField(
            model_name='player',
            name='key_sealed',
        ),
        migrations.RemoveField(
            model_name='player',
            name='serial',
        ),
    ]
