"""Which server should a player use? Rank a LAN's ready nodes nearest first, each with the reason shown to them.

Evidence, best first:
1. Round-trip times the player's own browser measured to each node (players/static js/player.js times a request to
   the node's public address and TCP port). Nothing beats a measurement from where the player actually is.
2. An estimate from the client address: its country from the offline GeoIP database in `geoip2fast`, compared with
   each node's country, then by great-circle distance between the country's centre and the node (its own
   coordinates when the host entered them, else its country's centre). Country centres come from the
   `countryinfo` package (MIT, no dependencies, ~400 kB: the REST Countries data set, lat/lng per ISO code); a
   table of our own would be invented coordinates.
3. The LAN's default node, then the order the host added the nodes in.

`rank_nodes` is pure: it takes the nodes, the measurements, the client's country and a country table, so tests
pass their own. `GeoIP` and `CountryTable` are the real lookups, loaded once per process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0


class NodeLike(Protocol):
    pk: int
    name: str
    country: str
    latitude: float | None
    longitude: float | None


class Countries(Protocol):
    def latlng(self, code: str) -> tuple[float, float] | None: ...

    def name(self, code: str) -> str: ...


class Ranked(NamedTuple):
    """(node, reason): a plain tuple with names."""

    node: NodeLike
    reason: str


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle (haversine) distance between two (latitude, longitude) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def rank_nodes(nodes: Sequence[NodeLike], *, rtts: Mapping[int, float | None] | None = None,
               client_country: str | None = None, countries: Countries | None = None,
               default_node_id: int | None = None) -> list[Ranked]:
    """Rank `nodes` (given in creation order) for one player. Returns every node exactly once."""
    estimated = _estimate(nodes, client_country=client_country, countries=countries,
                          default_node_id=default_node_id)
    if not rtts:
        return estimated
    measured = sorted((r for r in estimated if _valid(rtts.get(r.node.pk))), key=lambda r: rtts[r.node.pk])
    ranked = [Ranked(r.node, f"{rtts[r.node.pk]:.0f} ms from your browser") for r in measured]
    # The rest keep their estimated order; one the browser tried and could not reach says so.
    for r in estimated:
        if not _valid(rtts.get(r.node.pk)):
            reason = "did not answer your browser; " + r.reason if r.node.pk in rtts else r.reason
            ranked.append(Ranked(r.node, reason))
    return ranked


def _valid(ms) -> bool:
    return isinstance(ms, (int, float)) and math.isfinite(ms) and ms >= 0


def _estimate(nodes, *, client_country, countries, default_node_id) -> list[Ranked]:
    country = (client_country or "").upper()
    here = countries.latlng(country) if countries and len(country) == 2 else None
    if here is not None:
        placed = []
        for order, node in enumerate(nodes):
            where = _node_position(node, countries)
            same = (node.country or "").upper() == country
            if where is None and not same:
                continue
            km = distance_km(here, where) if where else 0.0
            placed.append(((0 if same else 1, km, order), node, _distance_reason(same, km, countries.name(country))))
        if placed:
            placed.sort(key=lambda item: item[0])
            seen = {node.pk for _, node, _ in placed}
            rest = _fallback([n for n in nodes if n.pk not in seen], default_node_id, unknown_location=True)
            return [Ranked(node, reason) for _, node, reason in placed] + rest
    return _fallback(list(nodes), default_node_id, unknown_location=False)


def _node_position(node, countries) -> tuple[float, float] | None:
    if node.latitude is not None and node.longitude is not None:
        return (node.latitude, node.longitude)
    return countries.latlng(node.country.upper()) if node.country else None


def _distance_reason(same_country: bool, km: float, where: str) -> str:
    if same_country:
        return f"in your country ({where}, going by your IP address)"
    rounded = int(round(km, -2)) if km >= 100 else int(round(km, -1))
    return f"about {rounded:,} km from {where} (going by your IP address)"


def _fallback(nodes, default_node_id, *, unknown_location: bool) -> list[Ranked]:
    first = [n for n in nodes if n.pk == default_node_id]
    rest = [n for n in nodes if n.pk != default_node_id]
    tail = "location unknown; " if unknown_location else ""
    ranked = [Ranked(n, f"{tail}the host's default server") for n in first]
    return ranked + [Ranked(n, f"{tail}in the order the host added servers") for n in rest]


# --- The real lookups -----------------------------------------------------------------------------------------


class CountryTable:
    """Country centres and names from the `countryinfo` package (ISO 3166 alpha-2 codes)."""

    def __init__(self, data: Mapping[str, dict]):
        self._data = data

    @classmethod
    @lru_cache(maxsize=1)
    def load(cls) -> "CountryTable":
        try:
            from countryinfo import CountryInfo
        except ImportError:  # requirements.txt pins it; say so instead of failing every player page
            log.warning("countryinfo is not installed: nearest-server estimates use the country code only")
            return cls({})
        data = {}
        for info in CountryInfo.all().values():
            code = (info.get("ISO") or {}).get("alpha2")
            latlng = info.get("latlng") or []
            if code and len(latlng) == 2:
                data[code.upper()] = {"latlng": (float(latlng[0]), float(latlng[1])), "name": info.get("name")}
        return cls(data)

    def latlng(self, code: str) -> tuple[float, float] | None:
        entry = self._data.get(code.upper())
        return entry["latlng"] if entry else None

    def name(self, code: str) -> str:
        entry = self._data.get(code.upper())
        return (entry and entry["name"]) or code.upper()


@lru_cache(maxsize=1)
def _geoip():
    from geoip2fast import GeoIP2Fast

    return GeoIP2Fast()  # ~0.1 s to load the bundled database; once per process


def country_of(address: str | None, lookup: Callable[[str], str | None] | None = None) -> str | None:
    """ISO code of the country an IP address is in, or None (private, unknown or malformed address)."""
    if not address:
        return None
    if lookup is not None:
        return lookup(address)
    return _geoip_country(address)


@lru_cache(maxsize=4096)
def _geoip_country(address: str) -> str | None:
    """Kept per process: a player's downloads and page loads come from the same few addresses."""
    try:
        code = _geoip().lookup(address).country_code
    except Exception:  # geoip2fast raises its own error types on malformed input; no estimate then
        return None
    return code if code and len(code) == 2 and code.isalpha() else None
