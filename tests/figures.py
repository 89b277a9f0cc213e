"""Figures some tests measure for docs/security.md: written only when scripts/security_report.py asks for them
(LANHUB_SECURITY_FIGURES names the JSON file), so an ordinary test run writes nothing."""

import json
import os


def record(key: str, value) -> None:
    path = os.environ.get("LANHUB_SECURITY_FIGURES")
    if not path:
        return
    figures = json.loads(open(path).read()) if os.path.exists(path) else {}
    figures[key] = value
    with open(path, "w") as f:
        json.dump(figures, f, indent=1)
