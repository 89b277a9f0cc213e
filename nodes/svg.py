"""The LAN's topology as a server-rendered SVG: one column per region, a box per node, a line per link.

Pure: it takes plain rows (anything with the attributes below) and returns the SVG text. The picture is served as
its own document (shown with <img>), under a CSP without inline styles, so it uses presentation attributes only,
never a <style> element. Every name is escaped: a region or a host name is text, never markup.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from html import escape

import segno

COLUMN_W, BOX_W, BOX_H, ROW_H, TOP, MARGIN = 270, 190, 58, 96, 56, 20
STATE_COLOURS = {"ready": "#2e7d32", "provisioning": "#b26a00", "failed": "#c62828", "new": "#607d8b"}
LINK_STYLES = {  # state -> (stroke colour, dash pattern)
    "up": ("#2e7d32", ""),
    "down": ("#c62828", "6 4"),
    "unknown": ("#90a4ae", "2 4"),
}


def layout(nodes: Sequence) -> dict[int, tuple[float, float]]:
    """Top-left corner of each node's box, by pk: regions left to right (sorted), the leader-first order inside."""
    columns: dict[str, list] = defaultdict(list)
    for node in nodes:
        columns[node.region or ""].append(node)
    positions = {}
    for col, region in enumerate(sorted(columns)):
        members = sorted(columns[region], key=lambda n: (-n.priority, n.created_at, n.pk))
        for row, node in enumerate(members):
            positions[node.pk] = (MARGIN + col * COLUMN_W, TOP + row * ROW_H)
    return positions


def render_topology(nodes: Sequence, links: Sequence, *, title: str = "LAN topology") -> str:
    if not nodes:
        return _document(360, 90, title, ['<text x="20" y="50" font-size="15" fill="#555">'
                                          'No servers yet. Add one below.</text>'])
    positions = layout(nodes)
    regions = sorted({n.region or "" for n in nodes})
    width = MARGIN * 2 + len(regions) * COLUMN_W - (COLUMN_W - BOX_W) + 60  # room for a bent same-region link
    rows = max(sum(1 for n in nodes if (n.region or "") == r) for r in regions)
    height = TOP + rows * ROW_H + MARGIN + 24  # room for a curve under the last row
    parts = [_region_label(MARGIN + i * COLUMN_W, r) for i, r in enumerate(regions)]
    # Links go first, so the boxes sit on top of their ends.
    parts += [_link(link, positions) for link in links
              if link.upstream_id in positions and link.downstream_id in positions]
    parts += [_node(node, *positions[node.pk]) for node in nodes]
    return _document(width, height, title, parts)


def _document(width: float, height: float, title: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:g} {height:g}" width="{width:g}" '
        f'height="{height:g}" font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" role="img">'
        f"<title>{escape(title)}</title>"
        f'<rect width="100%" height="100%" fill="#ffffff"/>' + "".join(parts) + "</svg>"
    )


def _region_label(x: float, region: str) -> str:
    text = escape(region or "(no region)")
    return f'<text x="{x:g}" y="30" font-size="13" font-weight="600" fill="#37474f">{text}</text>'


def _link(link, positions) -> str:
    (x1, y1), (x2, y2) = positions[link.upstream_id], positions[link.downstream_id]
    x1, y1, x2, y2 = x1 + BOX_W / 2, y1 + BOX_H / 2, x2 + BOX_W / 2, y2 + BOX_H / 2
    colour, dash = LINK_STYLES.get(link.state, LINK_STYLES["unknown"])
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    if x1 == x2:  # same column: bend the line out to the right so it does not hide behind the boxes between
        right = x1 + BOX_W / 2
        path = f"M{right:g} {y1:g} C{right + 48:g} {y1:g} {right + 48:g} {y2:g} {right:g} {y2:g}"
        mx, my = right + 36, (y1 + y2) / 2
    elif abs(x1 - x2) > COLUMN_W:
        # Across a column or more: dip into the gap below the row, so the line and its label pass under the boxes
        # of the columns between instead of hiding behind them. The label sits at the curve's midpoint (t = 0.5).
        cx, cy = (x1 + x2) / 2, max(y1, y2) + ROW_H
        path = f"M{x1:g} {y1:g} Q{cx:g} {cy:g} {x2:g} {y2:g}"
        mx, my = cx, (y1 + y2) / 4 + cy / 2
    else:
        path = f"M{x1:g} {y1:g} L{x2:g} {y2:g}"
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    label = f"{link.rtt_ms:.0f} ms" if link.rtt_ms is not None else link.state
    title = f"{_label(link.downstream)} → {_label(link.upstream)}: {link.state}"
    if link.rtt_ms is not None:
        title += f", {link.rtt_ms:.1f} ms"
    return (
        f'<g><title>{escape(title)}</title>'
        f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2.5"{dash_attr}/>'
        f'<rect x="{mx - 26:g}" y="{my - 10:g}" width="52" height="18" rx="9" fill="#ffffff" stroke="{colour}"/>'
        f'<text x="{mx:g}" y="{my + 3.5:g}" font-size="11" text-anchor="middle" fill="{colour}">'
        f"{escape(label)}</text></g>"
    )


def _label(node) -> str:
    """What people call the node ("Hong Kong"); its slug where there is no display name."""
    return getattr(node, "display_name", "") or node.name


def _node(node, x: float, y: float) -> str:
    colour = STATE_COLOURS.get(node.state, "#607d8b") if node.healthy else "#c62828"
    status = node.get_state_display() if hasattr(node, "get_state_display") else node.state
    if not node.healthy:
        status += " · down"
    return (
        f'<g><title>{escape(_label(node))}: {escape(status)}</title>'
        f'<rect x="{x:g}" y="{y:g}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="#f7f9fa" stroke="{colour}" '
        f'stroke-width="2"/>'
        f'<circle cx="{x + 16:g}" cy="{y + 20:g}" r="5" fill="{colour}"/>'
        f'<text x="{x + 28:g}" y="{y + 24:g}" font-size="14" font-weight="600" fill="#1b1f23">'
        f"{escape(_cut(_label(node), 20))}</text>"
        f'<text x="{x + 12:g}" y="{y + 45:g}" font-size="11" fill="#546e7a">'
        f"{escape(_cut(node.public_address, 22))} · {escape(status)}</text></g>"
    )


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def qr_svg_document(data: str, *, scale: int = 4) -> bytes:
    """The same QR code as a standalone SVG document (served as image/svg+xml and shown with <img>)."""
    out = io.BytesIO()
    segno.make(data, error="m").save(out, kind="svg", scale=scale, light="#ffffff", xmldecl=False, svgclass="qr",
                                     lineclass=None)
    return out.getvalue()


def qr_svg(data: str, *, scale: int = 4) -> str:
    """A QR code as an inline <svg> element (segno escapes nothing it does not draw: the data is only encoded)."""
    qr = segno.make(data, error="m")
    return qr.svg_inline(scale=scale, light="#ffffff", svgclass="qr", lineclass=None, omitsize=True)
