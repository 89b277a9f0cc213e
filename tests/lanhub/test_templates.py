"""Every template's comments: Django's {# #} ends at the end of its line, so a {# that runs over several lines
is printed on the page as text (it was, on the player page). Longer notes go in {% comment %}."""

from pathlib import Path

import pytest

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@pytest.mark.parametrize("path", sorted(TEMPLATES.rglob("*.html")), ids=lambda p: str(p.relative_to(TEMPLATES)))
def test_no_one_line_comment_runs_over_a_line(path):
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        opened = line.rfind("{#")
        assert opened == -1 or "#}" in line[opened:], f"{path.name}:{number}: {{# without #}} on the same line"
