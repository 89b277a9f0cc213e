"""Mask player and invite tokens wherever a URL reaches a log: they are credentials (a player token downloads the
player's private key). Django's "Not Found: /me/<token>/" warnings go through MaskTokensFilter (settings.LOGGING);
gunicorn's access log goes through GunicornLogger (Procfile: --logger-class).
"""

from __future__ import annotations

import logging
import re

from gunicorn.glogging import Logger

# Public links are /join/<token>/ and /me/<token>/...; whatever follows the prefix up to the next '/', '?', space
# or quote is the token (a wrong or partial token is still someone's guess at a credential).
_TOKEN_IN_PATH = re.compile(r"(/(?:join|me)/)[^/?\s\"']+")
MASK = r"\1…"


def mask(text: str) -> str:
    return _TOKEN_IN_PATH.sub(MASK, text)


class MaskTokensFilter(logging.Filter):
    """Rewrites the record's message with tokens masked; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a broken record is the formatter's to report, not ours)
            return True
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class GunicornLogger(Logger):
    """gunicorn's logger with tokens masked in the access log (request line, path, query and referer)."""

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q", "f", "{raw_uri}e"):
            if isinstance(atoms.get(key), str):
                atoms[key] = mask(atoms[key])
        return atoms
