"""The address plan by region: every region gets an aligned block sized for its nodes, nested in its parent's.

Why: routes and iroutes aggregate only over contiguous, aligned addresses. Pools handed out by age scatter a
region's nodes over the supernet, so a primary ends up routing each node of a far region on its own line (and a
ccd file past OpenVPN's 256-iroute limit). Here a region's nodes sit in its blocks, so the rest of the LAN
reaches the region through a few prefixes, usually one.

Units: a *slot* is what one node takes, its UDP pool (lower half) and its TCP pool (upper half): a /(p-1) for /p
pools. The usable space is the supernet minus the reserved top 1/64. Blocks are aligned runs of 2^k slots.

Allocation of a new node in region R (existing nodes keep their pools, whatever they are):
1. the lowest free slot of R's blocks that is not inside a child region's block;
2. else R grows: a block of R doubles in place when its buddy is free inside the parent's blocks (the parent
   doubles first if it must); else R gets a new block as large as its largest one, from its parent, placed
   where the most free space surrounds it, so it can double later (a parent without room grows the same way);
3. else (the hierarchy has no room left) any free slot: capacity never depends on how regions grew;
4. else the LAN is full: a PlanError naming its capacity.
Nodes without a region fill the root's space from the top down, out of the regions' way.

Blocks are stored with the plan (``Plan.blocks``) and passed back in, like link addresses, so a region keeps
its blocks as long as it has nodes.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Mapping, Sequence

from nodes.topology.model import NodePools, PlanError


def parent_region(region: str) -> str:
    return region.rpartition("/")[0]


class AddressPlan:
    def __init__(self, supernet: ipaddress.IPv4Network, pool_prefix: int, reserved: ipaddress.IPv4Network,
                 previous_blocks: Mapping[str, Sequence[str]] | None = None):
        self.supernet, self.pool_prefix = supernet, pool_prefix
        self.base = int(supernet.network_address)
        self.pool_size = 1 << (32 - pool_prefix)
        self.slot = 2 * self.pool_size
        self.count = (int(reserved.network_address) - self.base) // self.slot  # usable slots
        self.root = _decompose(0, self.count)
        self.occupied: list[int] = []  # sorted slot indices in use
        self.blocks: dict[str, list[tuple[int, int]]] = {"": list(self.root)}
        self._previous = previous_blocks or {}
        self._hint: dict[str, int] = {}

    @property
    def capacity(self) -> int:
        return self.count

    # -- occupancy ------------------------------------------------------------------------------------------

    def occupy_pool(self, pool: ipaddress.IPv4Network) -> None:
        """Mark the slots a pool a node already holds covers (a legacy pool may be bigger or smaller)."""
        first = (int(pool.network_address) - self.base) // self.slot
        last = (int(pool.broadcast_address) - self.base) // self.slot
        for index in range(max(0, first), min(self.count - 1, last) + 1):
            self._take(index)

    def _take(self, index: int) -> None:
        at = bisect.bisect_left(self.occupied, index)
        if at == len(self.occupied) or self.occupied[at] != index:
            self.occupied.insert(at, index)

    def _used(self, start: int, size: int) -> bool:
        at = bisect.bisect_left(self.occupied, start)
        return at < len(self.occupied) and self.occupied[at] < start + size

    # -- regions and blocks ---------------------------------------------------------------------------------

    def adopt_previous(self, regions: set[str]) -> None:
        """Keep the blocks the previous plan gave regions that still have nodes, parents before children."""
        wanted = set()
        for region in regions:
            while region:
                wanted.add(region)
                region = parent_region(region)
        for region in sorted(wanted, key=lambda r: (r.count("/"), r)):
            for text in self._previous.get(region, ()):
                block = self._block(text)
                if block and self._inside(block, parent_region(region)) and not self._overlaps_other(block, region):
                    self.blocks.setdefault(region, []).append(block)

    def _block(self, text: str) -> tuple[int, int] | None:
        try:
            net = ipaddress.IPv4Network(text)
        except ValueError:
            return None
        start, size = int(net.network_address) - self.base, net.num_addresses
        if start < 0 or size < self.slot or start % size or start // self.slot + size // self.slot > self.count:
            return None
        return start // self.slot, size // self.slot

    def _inside(self, block: tuple[int, int], region: str) -> bool:
        start, size = block
        return any(s <= start and start + size <= s + z for s, z in self.blocks.get(region, ()))

    def _overlaps_other(self, block: tuple[int, int], region: str) -> bool:
        """Whether ``block`` overlaps a block of a region that is neither ``region`` nor one of its ancestors."""
        start, size = block
        for other, blocks in self.blocks.items():
            if other == "" or other == region or region.startswith(other + "/"):
                continue
            if any(s < start + size and start < s + z for s, z in blocks):
                return True
        return False

    def _children_block_at(self, region: str, start: int, size: int) -> bool:
        """Whether [start, start+size) overlaps a block of a region below ``region``."""
        prefix = region + "/" if region else ""
        for other, blocks in self.blocks.items():
            if other and other != region and other.startswith(prefix):
                if any(s < start + size and start < s + z for s, z in blocks):
                    return True
        return False

    def _free(self, region: str, start: int, size: int) -> bool:
        return not self._used(start, size) and not self._children_block_at(region, start, size)

    # -- allocation ---------------------------------------------------------------------------------------

    def allocate(self, region: str) -> int:
        """A free slot for a new node of ``region`` (see the module docstring)."""
        for _ in range(64):  # each round grows the region once; the depth of the space bounds the rounds
            index = self._free_slot(region)
            if index is not None:
                self._take(index)
                return index
            if not region or not self._grow(region):
                break
        index = self._any_free_slot()
        if index is None:
            raise PlanError("full")
        self._take(index)
        return index

    def _free_slot(self, region: str) -> int | None:
        if not region:  # nodes without a region: from the top, away from the regions' blocks
            for start, size in sorted(self.root, reverse=True):
                for index in range(start + size - 1, start - 1, -1):
                    if self._free(region, index, 1):
                        return index
            return None
        hint = self._hint.get(region, 0)
        for start, size in sorted(self.blocks.get(region, ())):
            for index in range(max(start, hint), start + size):
                if self._free(region, index, 1):
                    self._hint[region] = index
                    return index
        return None

    def _any_free_slot(self) -> int | None:
        previous = -1
        for index in self.occupied:
            if index > previous + 1:
                return previous + 1
            previous = index
        return previous + 1 if previous + 1 < self.count else None

    def _grow(self, region: str) -> bool:
        """Give ``region`` room for one more slot: double a block in place, else a new block from the parent."""
        if not region:
            return False
        parent = parent_region(region)
        for start, size in sorted(self.blocks.get(region, ()), key=lambda b: (-b[1], b[0])):
            merged = (start - start % (2 * size), 2 * size)
            buddy = (merged[0] + size if merged[0] == start else merged[0], size)
            if merged[0] + merged[1] > self.count:
                continue
            if not self._inside(merged, parent) and not self._cover(parent, merged):
                continue
            if self._free_in_parent(region, parent, *buddy):
                self.blocks[region].remove((start, size))
                self.blocks[region] = [b for b in self.blocks[region] if b != buddy] + [merged]
                self._hint.pop(region, None)
                return True
        size = max((z for _, z in self.blocks.get(region, ())), default=1)
        for attempt in range(2):
            block = self._carve(parent, size, exclude=region)
            if block is not None:
                self.blocks.setdefault(region, []).append(block)
                self._hint.pop(region, None)
                return True
            if attempt == 0 and not self._grow(parent):
                return False
        return False

    def _free_in_parent(self, region: str, parent: str, start: int, size: int) -> bool:
        """The buddy may hold nothing but a block of ``region`` itself (two blocks merging)."""
        if self._used(start, size):
            return False
        prefix = parent + "/" if parent else ""
        for other, blocks in self.blocks.items():
            if other == region or not other or other == parent or not other.startswith(prefix):
                continue
            if any(s < start + size and start < s + z for s, z in blocks):
                return False
        return all(b == (start, size) or not (b[0] < start + size and start < b[0] + b[1])
                   for b in self.blocks.get(region, ()))

    def _cover(self, parent: str, merged: tuple[int, int]) -> bool:
        """Grow ``parent`` so that one of its blocks covers ``merged`` (by doubling the block that holds half)."""
        if not parent:
            return self._inside(merged, "")
        for _ in range(32):
            if self._inside(merged, parent):
                return True
            holder = next(((s, z) for s, z in self.blocks.get(parent, ())
                           if s <= merged[0] < s + z or merged[0] <= s < merged[0] + merged[1]), None)
            if holder is None or holder[1] >= merged[1]:
                return False
            start, size = holder
            grown = (start - start % (2 * size), 2 * size)
            buddy = (grown[0] + size if grown[0] == start else grown[0], size)
            grand = parent_region(parent)
            if grown[0] + grown[1] > self.count:
                return False
            if not self._inside(grown, grand) and not self._cover(grand, grown):
                return False
            if not self._free_in_parent(parent, grand, *buddy):
                return False
            self.blocks[parent].remove(holder)
            self.blocks[parent] = [b for b in self.blocks[parent] if b != buddy] + [grown]
        return False

    def _carve(self, parent: str, size: int, *, exclude: str) -> tuple[int, int] | None:
        """A free aligned block of ``size`` slots in the parent's blocks, where the most free space surrounds
        it (the largest free aligned block containing it), lowest address on ties."""
        best = None
        for start, block_size in self.blocks.get(parent, ()):
            found = self._best(parent, start, block_size, size, exclude)
            if found and (best is None or (-found[0], found[1]) < (-best[0], best[1])):
                best = found
        return (best[1], size) if best else None

    def _best(self, parent: str, start: int, size: int, wanted: int, exclude: str):
        if size < wanted:
            return None
        if self._free_excluding(parent, start, size, exclude):
            return size, start
        if size == wanted:
            return None
        half = size // 2
        options = [o for o in (self._best(parent, start, half, wanted, exclude),
                               self._best(parent, start + half, half, wanted, exclude)) if o]
        return min(options, key=lambda o: (-o[0], o[1])) if options else None

    def _free_excluding(self, parent: str, start: int, size: int, exclude: str) -> bool:
        if self._used(start, size):
            return False
        prefix = parent + "/" if parent else ""
        for other, blocks in self.blocks.items():
            if other and other != parent and other.startswith(prefix):
                if any(s < start + size and start < s + z for s, z in blocks):
                    return False
        return True

    # -- results --------------------------------------------------------------------------------------------

    def pools(self, index: int) -> NodePools:
        address = self.base + index * self.slot
        return NodePools(ipaddress.IPv4Network((address, self.pool_prefix)),
                         ipaddress.IPv4Network((address + self.pool_size, self.pool_prefix)))

    def region_blocks(self, regions: set[str]) -> dict[str, tuple[ipaddress.IPv4Network, ...]]:
        """The blocks of regions that have nodes (and their ancestors), as networks, for the stored plan."""
        keep = set()
        for region in regions:
            while region:
                keep.add(region)
                region = parent_region(region)
        prefix = lambda z: 32 - (z * self.slot).bit_length() + 1  # noqa: E731
        return {
            region: tuple(ipaddress.IPv4Network((self.base + s * self.slot, prefix(z))) for s, z in sorted(blocks))
            for region, blocks in sorted(self.blocks.items()) if region in keep and blocks
        }


def _decompose(start: int, count: int) -> list[tuple[int, int]]:
    """[start, start+count) as aligned blocks, largest first."""
    blocks = []
    while count > 0:
        size = (start & -start) if start else 1 << (count.bit_length() - 1)
        while size > count:
            size >>= 1
        blocks.append((start, size))
        start, count = start + size, count - size
    return blocks
