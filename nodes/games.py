"""LAN discovery: the games a LAN relays announcements for, and the per-player rate limit. Pure (no Django).

A host ticks presets and may add custom ports; the result is a ``DiscoverySpec`` (port ranges and multicast
groups) that nodes/render.py turns into the relay's config and the routes pushed to players. A port that is not
in the spec is not relayed. docs/discovery.md explains the design.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Per player, at the origin relay. Games announce about once a second (Minecraft every 1.5 s, Warcraft III and
# DirectPlay a few packets a second while a lobby is open); 20 packets/s with a burst of 40 leaves room for
# several games at once and a client browsing lobbies, while one flooding client costs every other player at
# most 20 packets/s and 32 kB/s.
RATE_PACKETS = 20
RATE_BYTES = 32_000
BURST_PACKETS = 40
BURST_BYTES = 64_000


@dataclass(frozen=True)
class Game:
    key: str
    label: str
    ports: tuple[tuple[int, int], ...]
    groups: tuple[str, ...] = ()  # multicast groups the game announces on

    @property
    def ports_label(self) -> str:
        text = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        return f"{', '.join(self.groups)}:{text}" if self.groups else text


PRESETS: tuple[Game, ...] = (
    Game("warcraft3", "Warcraft III / StarCraft", ((6112, 6112),)),
    Game("directplay", "Age of Empires II and other DirectPlay games", ((47624, 47624), (2300, 2400))),
    Game("minecraft-java", "Minecraft Java Edition", ((4445, 4445),), ("224.0.2.60",)),
    Game("minecraft-bedrock", "Minecraft Bedrock Edition", ((19132, 19133),)),
    Game("source", "Source engine games (Counter-Strike, Left 4 Dead, …)", ((27015, 27015),)),
    Game("factorio", "Factorio", ((34197, 34197),)),
)
PRESETS_BY_KEY = {g.key: g for g in PRESETS}
# The default ticks the games friends most often try first; DirectPlay's 101-port range is left to those who
# play those games.
DEFAULT_GAMES = ("warcraft3", "minecraft-java", "minecraft-bedrock", "source", "factorio")

_RANGE_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?\Z")
MAX_CUSTOM_RANGES = 16
MAX_PORTS = 2048  # all ranges together: a relay of "every port" would be a flood path, not a LAN


class GameListError(ValueError):
    """Bad game-list input; the message is for the host."""


@dataclass(frozen=True)
class DiscoverySpec:
    ports: tuple[tuple[int, int], ...] = ()
    groups: tuple[str, ...] = ()


def default_games() -> list[str]:
    return list(DEFAULT_GAMES)


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    """"27016, 7777-7780" -> ((7777, 7780), (27016, 27016)); raises GameListError with a readable message."""
    ranges = []
    for part in re.split(r"[,\s;]+", re.sub(r"\s*-\s*", "-", (text or "").strip())):
        if not part:
            continue
        match = _RANGE_RE.match(part)
        if not match:
            raise GameListError(f"{part!r} is not a port or a range such as 7777-7780.")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if not 1 <= low <= high <= 65535:
            raise GameListError(f"{part} is not a port range between 1 and 65535 (low-high).")
        ranges.append((low, high))
    if len(ranges) > MAX_CUSTOM_RANGES:
        raise GameListError(f"At most {MAX_CUSTOM_RANGES} custom ports or ranges.")
    return tuple(sorted(set(ranges)))


def format_ports(ranges) -> str:
    return ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def check_games(keys) -> list[str]:
    unknown = [k for k in keys if k not in PRESETS_BY_KEY]
    if unknown:
        raise GameListError(f"Unknown game {unknown[0]!r}.")
    return [g.key for g in PRESETS if g.key in set(keys)]


def discovery_spec(games, custom_ports: str = "") -> DiscoverySpec:
    """The ports and groups relayed for these presets plus the custom ports (merged, sorted, deterministic)."""
    ranges = set(parse_ports(custom_ports))
    groups = set()
    for key in check_games(games):
        ranges.update(PRESETS_BY_KEY[key].ports)
        groups.update(PRESETS_BY_KEY[key].groups)
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    if sum(high - low + 1 for low, high in merged) > MAX_PORTS:
        raise GameListError(f"Too many ports: LanHub relays at most {MAX_PORTS} ports per LAN.")
    return DiscoverySpec(ports=tuple(merged), groups=tuple(sorted(groups, key=ipaddress.IPv4Address)))


def games_label(games, custom_ports: str = "") -> list[str]:
    """Human lines for the player page and lobby: "Minecraft Java Edition", "custom ports 7777-7780"."""
    lines = [PRESETS_BY_KEY[k].label for k in check_games(games)]
    ranges = parse_ports(custom_ports)
    if ranges:
        lines.append(f"other games on UDP {format_ports(ranges)}")
    return lines
