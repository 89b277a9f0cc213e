"""A LAN's ``nodes_version``, changed by triggers on ``nodes_node`` in the same transaction as every node added,
deleted, or changed in a column players are given (nodes.models.PLAYER_NODE_COLUMNS, frozen here).

Each change sets a new random 63-bit value rather than adding one: processes keep rows keyed by (LAN, version), and
a count would repeat after a rollback or a restored backup (a LAN of the same id counting up again to the same
number with other nodes), where a random value does not (odds 2**-63). Existing LANs get one here.

Triggers, not code: nodes change through services, bulk ``.update()`` calls, the admin and the sync tasks, and a
download that trusted a version one of them forgot to bump would hand out a stale list of servers. On SQLite, a
later migration that rebuilds ``nodes_node`` (most AlterField operations) drops its triggers: such a migration
must run ``install_triggers`` again (tests/nodes/test_nodes_version.py fails until it does).

On PostgreSQL the bump takes the LAN row's lock until the node's transaction ends, like a LAN-level counter would.
"""

from django.db import migrations, models

COLUMNS = ("lan_id", "name", "public_address", "public_ipv6", "udp_port", "tcp_port", "country", "latitude",
           "longitude", "state", "healthy", "created_at")
NEW_SQLITE = "(random() & 9223372036854775807)"
NEW_POSTGRESQL = "floor(random() * 9223372036854775807)::bigint"
BUMP = "UPDATE nodes_lan SET nodes_version = {new} WHERE id = {row}.lan_id"

SQLITE = [
    f"CREATE TRIGGER nodes_node_version_insert AFTER INSERT ON nodes_node "
    f"BEGIN {BUMP.format(new=NEW_SQLITE, row='NEW')}; END",
    f"CREATE TRIGGER nodes_node_version_delete AFTER DELETE ON nodes_node "
    f"BEGIN {BUMP.format(new=NEW_SQLITE, row='OLD')}; END",
    f"CREATE TRIGGER nodes_node_version_update AFTER UPDATE ON nodes_node "
    f"WHEN {' OR '.join(f'OLD.{c} IS NOT NEW.{c}' for c in COLUMNS)} "
    f"BEGIN {BUMP.format(new=NEW_SQLITE, row='OLD')}; "
    f"{BUMP.format(new=NEW_SQLITE, row='NEW')} AND NEW.lan_id IS NOT OLD.lan_id; "
    f"END",
]
SQLITE_DROP = ["DROP TRIGGER IF EXISTS nodes_node_version_insert", "DROP TRIGGER IF EXISTS nodes_node_version_delete",
               "DROP TRIGGER IF EXISTS nodes_node_version_update"]

POSTGRESQL = [
    f"""CREATE OR REPLACE FUNCTION nodes_node_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN {BUMP.format(new=NEW_POSTGRESQL, row='OLD')}; END IF;
        IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.lan_id IS DISTINCT FROM OLD.lan_id) THEN
            {BUMP.format(new=NEW_POSTGRESQL, row='NEW')};
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER nodes_node_version_insert_delete AFTER INSERT OR DELETE ON nodes_node FOR EACH ROW "
    "EXECUTE FUNCTION nodes_node_bump_version()",
    f"CREATE TRIGGER nodes_node_version_update AFTER UPDATE ON nodes_node FOR EACH ROW "
    f"WHEN ({' OR '.join(f'OLD.{c} IS DISTINCT FROM NEW.{c}' for c in COLUMNS)}) "
    f"EXECUTE FUNCTION nodes_node_bump_version()",
]
POSTGRESQL_DROP = ["DROP TRIGGER IF EXISTS nodes_node_version_insert_delete ON nodes_node",
                   "DROP TRIGGER IF EXISTS nodes_node_version_update ON nodes_node",
                   "DROP FUNCTION IF EXISTS nodes_node_bump_version()"]


def _run(schema_editor, statements: dict[str, list[str]]) -> None:
    vendor = schema_editor.connection.vendor
    if vendor not in statements:
        raise NotImplementedError(f"nodes_version triggers for {vendor}: LanHub runs on SQLite or PostgreSQL")
    for sql in statements[vendor]:
        schema_editor.execute(sql, params=None)


def install_triggers(apps, schema_editor):
    _run(schema_editor, {
        "sqlite": [*SQLITE_DROP, *SQLITE, f"UPDATE nodes_lan SET nodes_version = {NEW_SQLITE}"],
        "postgresql": [*POSTGRESQL_DROP, *POSTGRESQL, f"UPDATE nodes_lan SET nodes_version = {NEW_POSTGRESQL}"],
    })


def drop_triggers(apps, schema_editor):
    _run(schema_editor, {"sqlite": SQLITE_DROP, "postgresql": POSTGRESQL_DROP})


class Migration(migrations.Migration):

    dependencies = [
        ('nodes', '0008_node_display_name'),
    ]

    operations = [
        migrations.AddField(
            model_name='lan',
            name='nodes_version',
            field=models.PositiveBigIntegerField(default=0, editable=False),
        ),
        migrations.RunPython(install_triggers, drop_triggers),
    ]
