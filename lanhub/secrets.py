"""Encryption at rest for private keys.

Every private key LanHub holds (CAs, nodes, links, players, SSH deploy keys) is sealed with a Fernet key derived
from LANHUB_KEY before it reaches the database, and unsealed only at the moment a file is rendered. Losing
LANHUB_KEY loses the PKI; changing it needs a re-seal, which is why it is separate from SECRET_KEY.
"""

import base64
import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class SecretError(Exception):
    """A sealed value could not be opened: LANHUB_KEY changed or the value is damaged."""


@functools.lru_cache(maxsize=4)
def _fernet(key_material: str) -> Fernet:
    # Any string works as LANHUB_KEY; a domain-separated SHA-256 turns it into the 32 bytes Fernet needs.
    digest = hashlib.sha256(b"lanhub-seal-v1:" + key_material.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def seal(plaintext: str) -> str:
    return _fernet(settings.LANHUB_KEY).encrypt(plaintext.encode()).decode()


def unseal(token: str) -> str:
    if not token:
        raise SecretError("There is no sealed value to open.")
    try:
        return _fernet(settings.LANHUB_KEY).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretError(
            "A private key could not be decrypted: LANHUB_KEY differs from the one that sealed it.") from None
