"""LANs, their nodes, the links between nodes, and the record of every background run.

The plan (nodes/topology/) is derived from these rows; what a planner must keep stable over a node's life (its
pools, a link's fixed address) is stored here so the next plan can honour it.
"""

import ipaddress
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Lower
from django.utils import timezone

from nodes import games, layout

# Names reach file paths, certificate names and shell commands: the rules live in nodes/layout.py, which the
# planner uses too. Every pattern ends in \Z, not $: "$" also matches just before a trailing newline, which
# would smuggle a line into a config file.
NAME_RE = layout.NODE_NAME_PATTERN
name_validator = RegexValidator(layout.NODE_NAME_PATTERN, layout.NODE_NAME_RULE)
region_validator = RegexValidator(layout.REGION_PATTERN, layout.REGION_RULE)


def display_name_validator(value) -> None:
    if not layout.is_display_name(value):
        raise ValidationError(layout.DISPLAY_NAME_RULE)


HOSTNAME_RE = re.compile(
    r"\A(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\Z")
unix_user_validator = RegexValidator(r"\A[a-z_][a-z0-9_-]{0,31}\Z", "Enter a Unix user name.")


def host_validator(value: str) -> None:
    """A DNS name or an IP address that parses as one ("dead:beef" looks like IPv6 but is not an address)."""
    if not isinstance(value, str):
        raise ValidationError("Enter a host name or an IP address.")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValidationError("Enter a host name or an IP address.") from None
        return
    if not HOSTNAME_RE.match(value):
        raise ValidationError("Enter a host name or an IP address.")
    if re.fullmatch(r"[0-9.]+", value):
        try:  # all digits and dots: it must be a real IPv4 address, not 999.1.1.1 passed on as a name
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValidationError("Enter a host name or an IP address.") from None


def ipv6_validator(value: str) -> None:
    """A global IPv6 address, as a literal: what a dual-stack node's players and links may dial besides
    public_address."""
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise ValidationError("Enter an IPv6 address, such as 2001:db8::10.") from None
    if address.ipv4_mapped:
        raise ValidationError("Enter a real IPv6 address; an IPv4 address goes in the public address.")


port_validators = [MinValueValidator(1), MaxValueValidator(65535)]


def validate_network(value: str) -> None:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IPv4 network in CIDR form: {exc}") from None
    if not net.is_private:
        raise ValidationError(f"{value} is not a private range; a LAN lives inside 10/8, 172.16/12 or 192.168/16.")


def validate_game_keys(value) -> None:
    if not isinstance(value, list):
        raise ValidationError("The game list must be a list of preset names.")
    try:
        games.check_games(value)
    except games.GameListError as exc:
        raise ValidationError(str(exc)) from None


def validate_custom_ports(value: str) -> None:
    try:
        games.parse_ports(value)
    except games.GameListError as exc:
        raise ValidationError(str(exc)) from None


class TopologyMode(models.TextChoices):
    AUTO = "auto", "Automatic"
    HUB = "hub", "Hub and spokes"
    MESH = "mesh", "Full mesh"
    HIERARCHICAL = "hierarchical", "Hierarchical (primary per region)"


class Lan(models.Model):
    """One virtual network of one host: its address plan, its PKI and its SSH deploy key."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="lans")
    name = models.CharField(max_length=layout.DISPLAY_NAME_MAX, validators=[display_name_validator])
    # Derived from the name when the LAN is created (layout.slug_for) and never changed: links and the CA's name
    # carry it.
    slug = models.SlugField(max_length=layout.SLUG_MAX, validators=[name_validator],
                            help_text="Short name used in links; derived from the name, and it never changes.")
    supernet = models.CharField(max_length=18, default="10.0.0.0/8", validators=[validate_network])
    pool_prefix = models.PositiveSmallIntegerField(
        default=16, validators=[MinValueValidator(9), MaxValueValidator(22)],
        help_text="Prefix length of each node's UDP and TCP client pool.",
    )
    topology_mode = models.CharField(max_length=16, choices=TopologyMode.choices, default=TopologyMode.AUTO)
    default_node = models.ForeignKey(
        "Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Offered to players when nothing better is known about where they are.",
    )
    # LAN discovery: the games whose broadcast/multicast announcements the nodes' relays carry (nodes/games.py).
    discovery_games = models.JSONField(
        default=games.default_games, blank=True, validators=[validate_game_keys],
        help_text="Games whose LAN announcements cross between servers.",
    )
    discovery_ports = models.CharField(
        max_length=200, blank=True, validators=[validate_custom_ports],
        help_text="Other UDP ports to relay, e.g. 7777, 27016-27020.",
    )
    # PKI. Private halves are sealed (lanhub/secrets.py) and never rendered in the admin.
    ca_cert = models.TextField(blank=True, editable=False)
    ca_key_sealed = models.TextField(blank=True, editable=False)
    tls_crypt_sealed = models.TextField(blank=True, editable=False)
    crl_pem = models.TextField(blank=True, editable=False)
    crl_number = models.PositiveIntegerField(default=0, editable=False)
    crl_next_update = models.DateTimeField(null=True, blank=True, editable=False)
    ssh_public_key = models.TextField(blank=True, editable=False)
    ssh_private_key_sealed = models.TextField(blank=True, editable=False)
    # Set to a new random value by database triggers (migration 0009) in the same transaction as any insert, delete
    # or change of a node column that players are given (PLAYER_NODE_COLUMNS). A download reads it with the player's
    # row and reads the LAN's ready nodes only when it moved (players.services.ready_node_rows). Triggers rather than
    # code: nodes change through services, bulk .update() calls, the admin and the sync tasks, and none may be missed.
    nodes_version = models.PositiveBigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name = "LAN"
        constraints = [models.UniqueConstraint(fields=("owner", "slug"), name="lan_unique_slug_per_owner")]
        ordering = ("name",)

    def __str__(self):
        return self.name

    def clean(self):
        super().clean()
        try:
            games.discovery_spec(self.discovery_games or [], self.discovery_ports)
        except games.GameListError as exc:
            raise ValidationError({"discovery_ports": str(exc)}) from None

    @property
    def discovery(self) -> games.DiscoverySpec:
        return games.discovery_spec(self.discovery_games or [], self.discovery_ports)

    @property
    def discovery_labels(self) -> list[str]:
        return games.games_label(self.discovery_games or [], self.discovery_ports)


class NodeState(models.TextChoices):
    NEW = "new", "New"
    PROVISIONING = "provisioning", "Provisioning"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class SyncState(models.TextChoices):
    IDLE = "idle", "Idle"
    RUNNING = "running", "Running"


class Node(models.Model):
    """A server a host registered. LanHub reaches it over SSH and runs OpenVPN instances on it.

    ``display_name`` is what the host typed and what people see ("Hong Kong", "杭州"); ``name`` is the node's slug,
    derived from it once (layout.slug_for) and never changed: the planner, the node's files, certificates, OpenVPN
    instances and the lab know the node by it."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="nodes")
    display_name = models.CharField("name", max_length=layout.DISPLAY_NAME_MAX, validators=[display_name_validator],
                                    help_text="As players will see it, in any language: Hong Kong, 杭州.")
    name = models.CharField("short name", max_length=layout.SLUG_MAX, validators=[name_validator],
                            help_text="For files, certificates and links. Leave blank to derive it from the name; "
                                      "it never changes.")
    region = models.CharField(max_length=200, blank=True, validators=[region_validator],
                              help_text="A path such as asia/cn/east; nodes are grouped by it.")
    priority = models.IntegerField(default=0, help_text="The highest-priority healthy node leads its region.")
    public_address = models.CharField(max_length=253, validators=[host_validator],
                                      help_text="Host name or IP address that players and other nodes connect to.")
    # A dual-stack node: profiles and links list this address after public_address, so a player (or node) whose
    # network has only one of the two families still connects. The servers listen on both (udp6, tcp6-server).
    public_ipv6 = models.CharField("Public IPv6 address", max_length=45, blank=True, validators=[ipv6_validator],
                                   help_text="Optional: also reachable over IPv6 at this address.")
    udp_port = models.PositiveIntegerField(default=1194, validators=port_validators)
    tcp_port = models.PositiveIntegerField(default=443, validators=port_validators)
    ssh_host = models.CharField("SSH host", max_length=253, validators=[host_validator],
                                help_text="Leave blank when it is the public address.")
    ssh_port = models.PositiveIntegerField(default=22, validators=port_validators)
    ssh_user = models.CharField(max_length=32, default="root",
                                validators=[unix_user_validator])
    ssh_host_key = models.TextField(blank=True, help_text="Pinned on first contact. Clear it to accept a new key.")
    latitude = models.FloatField(null=True, blank=True, validators=[MinValueValidator(-90), MaxValueValidator(90)])
    longitude = models.FloatField(null=True, blank=True,
                                  validators=[MinValueValidator(-180), MaxValueValidator(180)])
    country = models.CharField(max_length=2, blank=True, help_text="ISO 3166 code, used to guess the nearest node.")
    udp_pool = models.CharField(max_length=18, blank=True, help_text="Leave blank to let LanHub choose.")
    tcp_pool = models.CharField(max_length=18, blank=True, help_text="Leave blank to let LanHub choose.")
    pinned_upstream = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="pinned_downstreams")
    # Lifecycle and health.
    state = models.CharField(max_length=16, choices=NodeState.choices, default=NodeState.NEW)
    healthy = models.BooleanField(default=True)
    missed_polls = models.PositiveIntegerField(default=0)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    openvpn_version = models.CharField(max_length=64, blank=True)
    last_error = models.TextField(blank=True)
    # Sync bookkeeping: at most one sync runs per node (claimed atomically); a request made while one runs bumps
    # the generation so the running sync knows to go again.
    sync_state = models.CharField(max_length=16, choices=SyncState.choices, default=SyncState.IDLE)
    sync_claimed_at = models.DateTimeField(null=True, blank=True, editable=False)
    sync_generation = models.PositiveIntegerField(default=0)
    applied_files = models.JSONField(default=dict, blank=True, editable=False)
    # Certificates: the node's server certificate and the client certificate it uses on links.
    server_cert = models.TextField(blank=True, editable=False)
    server_key_sealed = models.TextField(blank=True, editable=False)
    link_cert = models.TextField(blank=True, editable=False)
    link_key_sealed = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("lan", "name"), name="node_unique_name_per_lan"),
            models.UniqueConstraint(Lower("display_name"), "lan", condition=~Q(display_name=""),
                                    name="node_unique_display_name_per_lan"),
            models.UniqueConstraint(fields=("lan", "udp_pool"), condition=~Q(udp_pool=""),
                                    name="node_unique_udp_pool_per_lan"),
            models.UniqueConstraint(fields=("lan", "tcp_pool"), condition=~Q(tcp_pool=""),
                                    name="node_unique_tcp_pool_per_lan"),
            models.CheckConstraint(condition=~Q(pinned_upstream=F("pk")), name="node_not_pinned_to_itself"),
        ]
        ordering = ("lan", "created_at", "pk")

    def __str__(self):
        return f"{self.display_name or self.name} ({self.lan})"

    def clean(self):
        errors = {}
        if self.lan_id and self.display_name and Node.objects.filter(
                lan_id=self.lan_id, display_name__iexact=self.display_name).exclude(pk=self.pk).exists():
            # Players choose a server by this name: two alike would be a coin toss (the slugs would differ).
            errors["display_name"] = [f"This LAN already has a server named “{self.display_name}”."]
        for field in ("udp_pool", "tcp_pool"):
            value = getattr(self, field)
            if value:
                try:
                    validate_network(value)
                except ValidationError as exc:
                    errors[field] = exc.messages
        if self.udp_pool and self.udp_pool == self.tcp_pool:
            errors["tcp_pool"] = ["The TCP pool must differ from the UDP pool."]
        if self.pinned_upstream_id and self.pk and self.pinned_upstream_id == self.pk:
            errors["pinned_upstream"] = ["A node cannot be its own upstream."]
        if self.pinned_upstream_id and self.pinned_upstream.lan_id != self.lan_id:
            errors["pinned_upstream"] = ["The pinned upstream must be a node of the same LAN."]
        if errors:
            raise ValidationError(errors)

    @property
    def region_label(self) -> str:
        return self.region or "(no region)"


# The node columns a player's profile and its ranking depend on (players.services.ReadyNode) and that choose which
# nodes players are given and in what order (state, healthy, created_at): a change to any of them, or a node added
# or deleted, changes its LAN's nodes_version (the triggers of migration 0009 list the same columns; a test changes
# each one).
PLAYER_NODE_COLUMNS = ("lan_id", "name", "public_address", "public_ipv6", "udp_port", "tcp_port", "country",
                       "latitude", "longitude", "state", "healthy", "created_at")

# A node's large columns, which pages that list nodes never show: defer them there (new columns still load).
NODE_BULK_FIELDS = ("applied_files", "server_cert", "server_key_sealed", "link_cert", "link_key_sealed",
                    "ssh_host_key", "last_error")


class LinkState(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    UP = "up", "Up"
    DOWN = "down", "Down"


class Link(models.Model):
    """A tunnel: `downstream` runs an OpenVPN client to `upstream` and holds `address` in upstream's UDP pool."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="links")
    upstream = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="downstream_links")
    downstream = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="upstream_links")
    address = models.GenericIPAddressField(protocol="IPv4")
    state = models.CharField(max_length=16, choices=LinkState.choices, default=LinkState.UNKNOWN)
    rtt_ms = models.FloatField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("upstream", "downstream"), name="link_unique_pair"),
            models.CheckConstraint(condition=~Q(upstream=F("downstream")), name="link_not_to_itself"),
        ]

    def __str__(self):
        return f"{self.downstream.name} → {self.upstream.name}"


class StoredPlan(models.Model):
    """A LAN's plan as last computed (nodes/planning.py): computed once per change (a node added, removed or
    failed over, link RTTs moved past a threshold, LAN settings), then read by every sync and drift check."""

    lan = models.OneToOneField(Lan, on_delete=models.CASCADE, related_name="stored_plan")
    version = models.PositiveIntegerField(default=0)
    data = models.JSONField(default=dict, help_text="topology.Plan.to_data(), plus the link RTTs it used.")
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"plan {self.version} of {self.lan}"


class RevokedCertificate(models.Model):
    """A certificate that must appear in the LAN's CRL (a revoked player, or one whose device was lost)."""

    lan = models.ForeignKey(Lan, on_delete=models.CASCADE, related_name="revoked_certificates")
    serial = models.CharField(max_length=64, help_text="Hexadecimal serial number.")
    common_name = models.CharField(max_length=64)
    revoked_at = models.DateTimeField(default=timezone.now)
    reason = models.CharField(max_length=100, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=("lan", "serial"), name="revoked_unique_serial_per_lan")]

    def __str__(self):
        return f"{self.common_name} ({self.serial})"


class SyncStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    ERRORED = "errored", "Errored"
    SKIPPED = "skipped", "Skipped"


class SyncRun(models.Model):
    """One background run against one node: what it did, how long each step took, and how it ended."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="sync_runs")
    kind = models.CharField(max_length=16, default="sync")  # sync | drift | status
    reason = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16, choices=SyncStatus.choices, default=SyncStatus.QUEUED)
    current_step = models.CharField(max_length=64, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    steps = models.JSONField(default=list, blank=True)
    changed_files = models.JSONField(default=list, blank=True)
    restarted = models.JSONField(default=list, blank=True)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    retryable = models.BooleanField(default=False, help_text="Failed on a connection problem that may pass.")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at", "-pk")
        indexes = [models.Index(fields=("node", "-created_at"), name="syncrun_node_recent")]

    def __str__(self):
        return f"{self.kind} of {self.node.name}: {self.status}"

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class VpnSession(models.Model):
    """Someone connected to a node's OpenVPN instance, as its management interface last reported."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="sessions")
    instance = models.CharField(max_length=64)
    common_name = models.CharField(max_length=64)
    player = models.ForeignKey("players.Player", null=True, blank=True, on_delete=models.CASCADE,
                               related_name="sessions")
    vpn_address = models.GenericIPAddressField(protocol="IPv4", null=True, blank=True)
    real_address = models.CharField(max_length=64, blank=True)
    connected_since = models.DateTimeField(null=True, blank=True)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("common_name",)

    def __str__(self):
        return f"{self.common_name} on {self.node.name}"


def is_valid_name(value: str) -> bool:
    return layout.is_node_name(value)
