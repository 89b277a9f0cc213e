"""Keys, certificates and CRLs for a LAN: the pure PKI core.

Everything here is plain data in, plain data out: no Django, no database, no network and no clock (callers pass
``now``). It is built on ``cryptography`` alone so that issuing a player is an in-process call of a few
milliseconds instead of an easy-rsa/openssl subprocess chain (benchmarks/issue_player.py measures the difference).

Choices worth knowing:
- EC P-256 keys with ECDSA-SHA256 signatures: supported by OpenVPN 2.4+, OpenVPN Connect 3 and Tunnelblick, and
  paired with ``dh none`` on the servers.
- Private keys come back as unencrypted PKCS8 PEM; callers seal them (lanhub/secrets.py) before storing them.
- ``notBefore`` and a CRL's ``thisUpdate`` are backdated by ``CLOCK_SKEW``: a node or laptop whose clock runs a
  little behind would otherwise reject a brand-new certificate, or reject *every* client because the CRL is
  "not yet valid".
- Nothing LanHub issues has an expiry date (``notAfter`` 99991231235959Z, RFC 5280 4.1.2.5): not a LAN's CA,
  not its players' certificates, not its nodes' certificates. Nothing renews a CA, and every profile embeds it,
  so a ten-year CA would stop the whole LAN on one day with nobody warned; a player ends by revocation (the
  nodes' revocation directory, which has no expiry either); and a dated node certificate would stop the LAN once
  the portal had been down longer than the date allowed. ``days`` remains for certificates issued with a date
  before this (nodes/services.py renews those) and for tests; the trade-off is in docs/security.md, "Lifetimes".
- A leaf never outlives its CA: past the CA's ``notAfter`` it cannot verify anyway, and the stored ``not_after``
  should tell the truth.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization.ssh import SSHPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = timedelta(hours=1)
# "No well-defined expiration date" (RFC 5280 4.1.2.5), encoded as GeneralizedTime: what ``days=None`` issues.
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
TLS_CRYPT_BEGIN = "-----BEGIN OpenVPN Static key V1-----"
TLS_CRYPT_END = "-----END OpenVPN Static key V1-----"
_COMMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # first character alphanumeric: no "-opt", ".", ".."
_SSH_COMMENT = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")  # printable ASCII, no newline, no edge spaces


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key, both PEM, plus the fields callers store alongside them."""

    cert_pem: str
    key_pem: str
    serial: int
    common_name: str
    not_after: datetime


CaLike = Issued | tuple[str, str]


def create_ca(*, name: str, now: datetime, days: int | None = None) -> Issued:
    """Create a LAN's self-signed CA. ``pathlen:0`` because a LAN CA signs only nodes and players, never sub-CAs.
    ``days=None``: no expiry date (see the module docstring)."""
    subject = _name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _base_builder(subject=subject, issuer=subject, public_key=key.public_key(), now=now, not_after=_end(now, days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    )
    return _issued(builder.sign(key, hashes.SHA256()), key, name)


def issue_server(*, ca: CaLike, common_name: str, now: datetime, days: int | None = None) -> Issued:
    """Issue a node's server certificate: serverAuth is what the clients' ``remote-cert-tls server`` demands."""
    return _issue_leaf(ca=ca, common_name=common_name, now=now, days=days, server=True)


def issue_client(*, ca: CaLike, common_name: str, now: datetime, days: int | None = None) -> Issued:
    """Issue a player's (or a link client's) certificate; clientAuth keeps it from posing as a node's server."""
    return _issue_leaf(ca=ca, common_name=common_name, now=now, days=days, server=False)


def make_tls_crypt_key() -> str:
    """A 2048-bit key in the format ``openvpn --genkey secret`` writes, so every OpenVPN build reads it."""
    hex_digits = os.urandom(256).hex()
    lines = [hex_digits[i : i + 32] for i in range(0, len(hex_digits), 32)]
    header = "#\n# 2048 bit OpenVPN static key\n#\n"
    return header + "\n".join([TLS_CRYPT_BEGIN, *lines, TLS_CRYPT_END]) + "\n"


def make_crl(*, ca: CaLike, revoked: Iterable[tuple[int, datetime]], now: datetime, number: int, days: int = 30) -> str:
    """Sign the LAN's CRL.

    OpenVPN's ``crl-verify`` rejects every client once ``nextUpdate`` has passed, so callers must re-sign before
    ``crl_next_update()``; ``number`` must grow with each CRL (RFC 5280 5.2.3). A serial listed twice keeps its
    earliest revocation date, so a duplicated row cannot break the sync.
    """
    if number < 0:
        raise ValueError("CRL number must not be negative")
    ca_cert, ca_key = _load_ca(ca)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(_end(now, days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    for serial, when in sorted(_earliest_revocations(revoked).items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def crl_next_update(crl_pem: str) -> datetime:
    """When a CRL stops being accepted; the sync re-signs it well before then."""
    next_update = x509.load_pem_x509_crl(crl_pem.encode()).next_update_utc
    if next_update is None:
        raise ValueError("CRL has no nextUpdate")
    return next_update


def make_ssh_keypair(*, comment: str) -> tuple[str, str]:
    """Create the ed25519 deploy key LanHub uses to reach nodes: (OpenSSH private PEM, authorized_keys line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    return private_pem, _public_line(key.public_key(), comment)


def ssh_public_line(private_pem: str, comment: str) -> str:
    """Re-derive the authorized_keys line from a stored private key, so the public half never needs storing."""
    key = serialization.load_ssh_private_key(private_pem.encode(), password=None)
    return _public_line(key.public_key(), comment)


def fingerprint_sha256(public_key_blob_or_line: bytes | str) -> str:
    """Fingerprint a public key as ``ssh-keygen -l`` and ssh's host-key prompt print it (``SHA256:...``).

    Accepts the raw wire blob (what paramiko's ``key.asbytes()`` returns) or an OpenSSH public line, so host-key
    pinning can compare what the server presented with what the host pasted.
    """
    blob = _ssh_blob(public_key_blob_or_line)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


# --- helpers -----------------------------------------------------------------------------------------------------


def _issue_leaf(*, ca: CaLike, common_name: str, now: datetime, days: int | None, server: bool) -> Issued:
    subject = _name(common_name)
    ca_cert, ca_key = _load_ca(ca)
    not_after = min(_end(now, days), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    public = key.public_key()
    builder = (
        _base_builder(subject=subject, issuer=ca_cert.subject, public_key=public, now=now, not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=server), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
    return _issued(builder.sign(ca_key, hashes.SHA256()), key, common_name)


def _base_builder(
    *, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime, not_after: datetime
) -> x509.CertificateBuilder:
    """What every certificate here shares: random serial, backdated start, SKI."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, common_name: str) -> Issued:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return Issued(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key_pem,
        serial=cert.serial_number,
        common_name=common_name,
        not_after=cert.not_valid_after_utc,
    )


def _name(common_name: str) -> x509.Name:
    """Only a conservative character set reaches a certificate: CNs become ccd file names and verify-x509-name args."""
    if not isinstance(common_name, str) or not _COMMON_NAME.fullmatch(common_name):
        raise ValueError(
            f"invalid common name {common_name!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _end(now: datetime, days: int | None) -> datetime:
    _require_aware(now)
    if days is None:
        return NO_EXPIRY
    if days < 1:
        raise ValueError("days must be at least 1")
    return now + timedelta(days=days)


def _require_aware(now: datetime) -> None:
    """A naive datetime would be read as UTC by cryptography and silently shift validity by the local offset."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(timezone.utc))")


def _key_usage(
    *, digital_signature: bool = False, key_agreement: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _load_ca(ca: CaLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Accept an ``Issued`` or a (cert_pem, key_pem) pair, and refuse a key that does not belong to the cert."""
    cert_pem, key_pem = (ca.cert_pem, ca.key_pem) if isinstance(ca, Issued) else ca
    return _parse_ca(cert_pem, key_pem)


@functools.lru_cache(maxsize=64)
def _parse_ca(cert_pem: str, key_pem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Parsed and checked once per CA and process: a LAN issues every player with the same CA, and parsing the
    PEMs and matching key to certificate costs more than signing. The objects are immutable and thread-safe."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError("CA key does not match the CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("certificate is not a CA (basicConstraints CA:TRUE missing)")
    return cert, key


def _earliest_revocations(revoked: Iterable[tuple[int, datetime]]) -> dict[int, datetime]:
    earliest: dict[int, datetime] = {}
    for serial, when in revoked:
        _require_aware(when)
        if serial <= 0:
            raise ValueError(f"invalid certificate serial {serial}")
        earliest[serial] = min(when, earliest.get(serial, when))
    return earliest


def _public_line(public_key: SSHPublicKeyTypes, comment: str) -> str:
    if not _SSH_COMMENT.fullmatch(comment):
        raise ValueError(f"invalid SSH key comment {comment!r}: use printable ASCII on one line")
    openssh = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{openssh.decode()} {comment}"


def _ssh_blob(value: bytes | str) -> bytes:
    """Return the wire blob; a line's base64 must decode and name the same key type as the line's first field."""
    if isinstance(value, bytes) and not value.startswith((b"ssh-", b"ecdsa-", b"sk-")):
        return value  # already the wire blob: it starts with a 4-byte length, never with ASCII "ssh-"
    line = value.decode() if isinstance(value, bytes) else value
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("expected an OpenSSH public key line: '<type> <base64> [comment]'")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except binascii.Error as exc:
        raise ValueError("the public key's base64 does not decode") from exc
    type_length = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + type_length] != fields[0].encode():
        raise ValueError(f"the public key's blob is not a {fields[0]} key")
    return blob
