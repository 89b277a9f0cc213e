"""Nodes get a display name typed freely beside their slug (``name``, unchanged): existing nodes are shown by
their slug until the host renames them. A LAN whose slug breaks the name rules gets one derived from its name."""

import django.core.validators
import django.db.models.functions.text
import nodes.models
from django.db import migrations, models

from nodes import layout


def fill_names(apps, schema_editor):
    Node = apps.get_model("nodes", "Node")
    Lan = apps.get_model("nodes", "Lan")
    for node in Node.objects.filter(display_name="").only("pk", "name"):
        Node.objects.filter(pk=node.pk).update(display_name=node.name)
    for lan in Lan.objects.only("pk", "owner_id", "name", "slug"):
        if layout.is_node_name(lan.slug):
            continue
        taken = set(Lan.objects.filter(owner_id=lan.owner_id).exclude(pk=lan.pk).values_list("slug", flat=True))
        Lan.objects.filter(pk=lan.pk).update(slug=layout.unique_slug(layout.slug_for(lan.name, fallback="lan"), taken))


class Migration(migrations.Migration):

    dependencies = [
        ('nodes', '0007_node_public_ipv6'),
    ]

    operations = [
        migrations.AddField(
            model_name='node',
            name='display_name',
            field=models.CharField(default='', help_text='As players will see it, in any language: Hong Kong, 杭州.', max_length=64, validators=[nodes.models.display_name_validator], verbose_name='name'),
            preserve_default=False,
        ),
        migrations.RunPython(fill_names, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='lan',
            name='name',
            field=models.CharField(max_length=64, validators=[nodes.models.display_name_validator]),
        ),
        migrations.AlterField(
            model_name='lan',
            name='slug',
            field=models.SlugField(help_text='Short name used in links; derived from the name, and it never changes.', max_length=32, validators=[django.core.validators.RegexValidator('\\A[a-z][a-z0-9-]{0,31}\\Z', "Use 1–32 lowercase letters, digits or '-', starting with a letter.")]),
        ),
        migrations.AlterField(
            model_name='node',
            name='name',
            field=models.CharField(help_text='For files, certificates and links. Leave blank to derive it from the name; it never changes.', max_length=32, validators=[django.core.validators.RegexValidator('\\A[a-z][a-z0-9-]{0,31}\\Z', "Use 1–32 lowercase letters, digits or '-', starting with a letter.")], verbose_name='short name'),
        ),
        migrations.AlterField(
            model_name='node',
            name='ssh_host',
            field=models.CharField(help_text='Leave blank when it is the public address.', max_length=253, validators=[nodes.models.host_validator], verbose_name='SSH host'),
        ),
        migrations.AddConstraint(
            model_name='node',
            constraint=models.UniqueConstraint(django.db.models.functions.text.Lower('display_name'), models.F('lan'), condition=models.Q(('display_name', ''), _negated=True), name='node_unique_display_name_per_lan'),
        ),
    ]
