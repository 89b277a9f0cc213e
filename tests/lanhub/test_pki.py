"""lanhub.pki checked by the real tools that will consume its output: openssl, openvpn and ssh-keygen."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from lanhub import pki

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=timezone.utc)


def run(args: Sequence[str | Path], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30, check=check)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)  # openvpn warns about readable key files; keep the logs clean
    return path


def openssl_text(tmp_path: Path, cert_pem: str) -> str:
    return run(["openssl", "x509", "-noout", "-text", "-in", write(tmp_path, "show.pem", cert_pem)], check=True).stdout


def verify(tmp_path: Path, ca_pem: str, cert_pem: str, *extra: str, crl_pem: str | None = None) -> str:
    """`openssl verify` at NOW (certificates are dated in 2030); returns its combined output."""
    args = ["openssl", "verify", "-attime", str(int(NOW.timestamp())), *extra]
    if crl_pem is not None:
        args += ["-crl_check", "-CRLfile", write(tmp_path, "crl.pem", crl_pem)]
    args += ["-CAfile", write(tmp_path, "ca.pem", ca_pem), write(tmp_path, "leaf.pem", cert_pem)]
    result = run(args)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.create_ca(name="lan-fridays", now=NOW)


# --- CA ----------------------------------------------------------------------------------------------------------


def test_the_ca_is_an_ec_p256_ca_that_may_only_sign_certificates_and_crls(tmp_path, ca):
    text = openssl_text(tmp_path, ca.cert_pem)
    assert "ASN1 OID: prime256v1" in text and "ecdsa-with-SHA256" in text
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:0", text)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign\n", text)
    assert "Subject Key Identifier" in text and "Subject: CN = lan-fridays" in text


def test_the_ca_verifies_itself_and_reports_its_real_expiry(tmp_path, ca):
    assert verify(tmp_path, ca.cert_pem, ca.cert_pem).strip().endswith("leaf.pem: OK")
    assert ca.not_after == pki.NO_EXPIRY
    assert ca.common_name == "lan-fridays" and ca.serial > 0


def test_the_ca_and_player_certificates_have_no_expiry_date(tmp_path, ca):
    # Nothing renews a CA (every profile embeds it) and a player ends by revocation: a date would only stop the
    # LAN, or a player, on a day nobody chose. RFC 5280's "no well-defined expiration date" is 99991231235959Z.
    player = pki.issue_client(ca=ca, common_name="bob", now=NOW)
    assert "Not After : Dec 31 23:59:59 9999 GMT" in openssl_text(tmp_path, ca.cert_pem)
    assert "Not After : Dec 31 23:59:59 9999 GMT" in openssl_text(tmp_path, player.cert_pem)
    far = str(int(datetime(2300, 1, 1, tzinfo=timezone.utc).timestamp()))
    args = ["openssl", "verify", "-attime", far, "-purpose", "sslclient",
            "-CAfile", write(tmp_path, "ca.pem", ca.cert_pem)]
    assert run([*args, write(tmp_path, "p.pem", player.cert_pem)]).returncode == 0
    # A date is still issued when asked for (node certificates made before they stopped expiring had 730 days).
    node = pki.issue_server(ca=ca, common_name="node-hangzhou", now=NOW, days=730)
    assert node.not_after == NOW + timedelta(days=730)


# --- leaves ------------------------------------------------------------------------------------------------------


def test_a_server_certificate_verifies_as_a_tls_server_and_not_as_a_client(tmp_path, ca):
    server = pki.issue_server(ca=ca, common_name="node-hangzhou", now=NOW)
    assert verify(tmp_path, ca.cert_pem, server.cert_pem, "-purpose", "sslserver").strip().endswith(": OK")
    assert "unsuitable certificate purpose" in verify(tmp_path, ca.cert_pem, server.cert_pem, "-purpose", "sslclient")
    text = openssl_text(tmp_path, server.cert_pem)
    assert re.search(r"Extended Key Usage: \n\s+TLS Web Server Authentication\n", text)
    assert re.search(r"Key Usage: critical\s+Digital Signature, Key Agreement\n", text)
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", text)
    assert "DNS:node-hangzhou" in text and "Authority Key Identifier" in text and "Subject Key Identifier" in text


def test_a_client_certificate_verifies_as_a_tls_client_and_not_as_a_server(tmp_path, ca):
    client = pki.issue_client(ca=ca, common_name="bob", now=NOW)
    assert verify(tmp_path, ca.cert_pem, client.cert_pem, "-purpose", "sslclient").strip().endswith(": OK")
    assert "unsuitable certificate purpose" in verify(tmp_path, ca.cert_pem, client.cert_pem, "-purpose", "sslserver")
    text = openssl_text(tmp_path, client.cert_pem)
    assert re.search(r"Extended Key Usage: \n\s+TLS Web Client Authentication\n", text)
    assert "Subject: CN = bob" in text and "Issuer: CN = lan-fridays" in text


def test_a_certificate_from_another_lan_does_not_verify(tmp_path, ca):
    other = pki.create_ca(name="lan-other", now=NOW)
    stranger = pki.issue_client(ca=other, common_name="bob", now=NOW)
    assert "unable to get local issuer certificate" in verify(tmp_path, ca.cert_pem, stranger.cert_pem)


def test_a_ca_given_as_a_pem_pair_issues_the_same_way(tmp_path, ca):
    client = pki.issue_client(ca=(ca.cert_pem, ca.key_pem), common_name="carol", now=NOW)
    assert verify(tmp_path, ca.cert_pem, client.cert_pem).strip().endswith(": OK")


def test_issued_fields_match_the_certificate_and_serials_are_random(ca):
    issued = [pki.issue_client(ca=ca, common_name=f"p{i}", now=NOW, days=30) for i in range(20)]
    for item in issued:
        cert = x509.load_pem_x509_certificate(item.cert_pem.encode())
        assert cert.serial_number == item.serial and 0 < item.serial < 2**159
        assert cert.not_valid_after_utc == item.not_after == NOW + timedelta(days=30)
        assert item.key_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted: the caller seals it
    assert len({item.serial for item in issued}) == 20


def test_a_certificate_is_valid_for_a_verifier_whose_clock_is_a_little_behind(tmp_path, ca):
    client = pki.issue_client(ca=ca, common_name="bob", now=NOW)
    behind = str(int((NOW - timedelta(minutes=30)).timestamp()))
    args = ["openssl", "verify", "-attime", behind, "-CAfile", write(tmp_path, "ca.pem", ca.cert_pem)]
    assert run([*args, write(tmp_path, "c.pem", client.cert_pem)]).returncode == 0


def test_a_leaf_never_outlives_its_ca(ca):
    short_ca = pki.create_ca(name="lan-short", now=NOW, days=10)
    assert pki.issue_client(ca=short_ca, common_name="bob", now=NOW, days=365).not_after == short_ca.not_after


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "bob smith", "../etc/passwd", "-rf", ".hidden", "bob\nup", "bøb", "bob/x", "a;b", "x$y"]
)
def test_a_bad_common_name_raises_a_clear_value_error(ca, name):
    with pytest.raises(ValueError, match="invalid common name"):
        pki.issue_client(ca=ca, common_name=name, now=NOW)


def test_a_64_character_name_with_every_allowed_character_kind_is_accepted(ca):
    name = "Node-1_hz.example" + "x" * 47
    assert pki.issue_server(ca=ca, common_name=name, now=NOW).common_name == name


def test_a_naive_clock_raises_instead_of_silently_shifting_validity():
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.create_ca(name="lan", now=datetime(2030, 1, 1))


def test_a_ca_key_that_does_not_match_the_ca_certificate_is_refused(ca):
    other = pki.create_ca(name="lan-other", now=NOW)
    with pytest.raises(ValueError, match="does not match"):
        pki.issue_client(ca=(ca.cert_pem, other.key_pem), common_name="bob", now=NOW)


def test_a_leaf_certificate_cannot_act_as_a_ca(ca):
    leaf = pki.issue_server(ca=ca, common_name="node-x", now=NOW)
    with pytest.raises(ValueError, match="not a CA"):
        pki.issue_client(ca=leaf, common_name="bob", now=NOW)


# --- CRL ---------------------------------------------------------------------------------------------------------


def test_the_crl_parses_in_openssl_and_lists_the_revoked_serial(tmp_path, ca):
    bob = pki.issue_client(ca=ca, common_name="bob", now=NOW)
    crl = pki.make_crl(ca=ca, revoked=[(bob.serial, NOW)], now=NOW, number=7)
    text = run(["openssl", "crl", "-noout", "-text", "-in", write(tmp_path, "crl.pem", crl)], check=True).stdout
    serial_hex = f"{bob.serial:X}".rjust(-(-len(f"{bob.serial:X}") // 2) * 2, "0")  # openssl prints whole bytes
    assert f"Serial Number: {serial_hex}" in text
    assert re.search(r"X509v3 CRL Number: \n\s+7\n", text)
    assert "Authority Key Identifier" in text and "Issuer: CN = lan-fridays" in text


def test_a_revoked_certificate_is_rejected_and_others_still_verify(tmp_path, ca):
    bob, carol = (pki.issue_client(ca=ca, common_name=n, now=NOW) for n in ("bob", "carol"))
    crl = pki.make_crl(ca=ca, revoked=[(bob.serial, NOW - timedelta(minutes=1))], now=NOW, number=1)
    assert "certificate revoked" in verify(tmp_path, ca.cert_pem, bob.cert_pem, crl_pem=crl)
    assert verify(tmp_path, ca.cert_pem, carol.cert_pem, crl_pem=crl).strip().endswith(": OK")


def test_an_empty_crl_is_valid_and_rejects_nobody(tmp_path, ca):
    carol = pki.issue_client(ca=ca, common_name="carol", now=NOW)
    crl = pki.make_crl(ca=ca, revoked=[], now=NOW, number=0)
    assert verify(tmp_path, ca.cert_pem, carol.cert_pem, crl_pem=crl).strip().endswith(": OK")


def test_a_fresh_crl_is_accepted_by_a_node_whose_clock_is_a_little_behind(tmp_path, ca):
    """Without backdating thisUpdate, OpenVPN's crl-verify on such a node would reject every client."""
    carol = pki.issue_client(ca=ca, common_name="carol", now=NOW - timedelta(days=1))
    crl = pki.make_crl(ca=ca, revoked=[], now=NOW, number=1)
    behind = str(int((NOW - timedelta(minutes=30)).timestamp()))
    args = ["openssl", "verify", "-attime", behind, "-crl_check", "-CRLfile", write(tmp_path, "crl.pem", crl)]
    result = run([*args, "-CAfile", write(tmp_path, "ca.pem", ca.cert_pem), write(tmp_path, "c.pem", carol.cert_pem)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_crl_next_update_is_now_plus_days_and_openssl_refuses_the_crl_after_it(tmp_path, ca):
    crl = pki.make_crl(ca=ca, revoked=[], now=NOW, number=1, days=30)
    assert pki.crl_next_update(crl) == NOW + timedelta(days=30)
    carol = pki.issue_client(ca=ca, common_name="carol", now=NOW)
    later = str(int((NOW + timedelta(days=31)).timestamp()))
    args = ["openssl", "verify", "-attime", later, "-crl_check", "-CRLfile", write(tmp_path, "crl.pem", crl)]
    result = run([*args, "-CAfile", write(tmp_path, "ca.pem", ca.cert_pem), write(tmp_path, "c.pem", carol.cert_pem)])
    assert "CRL has expired" in result.stdout + result.stderr


def test_a_serial_listed_twice_is_revoked_once_with_its_earliest_date(ca):
    crl_pem = pki.make_crl(ca=ca, revoked=[(5, NOW), (5, NOW - timedelta(days=2))], now=NOW, number=1)
    entries = list(x509.load_pem_x509_crl(crl_pem.encode()))
    assert [(e.serial_number, e.revocation_date_utc) for e in entries] == [(5, NOW - timedelta(days=2))]


# --- tls-crypt ---------------------------------------------------------------------------------------------------


def test_the_tls_crypt_key_has_the_layout_openvpn_genkey_writes(tmp_path):
    reference = tmp_path / "reference.key"
    run(["openvpn", "--genkey", "secret", reference], check=True)
    skeleton = lambda text: re.sub(r"^[0-9a-f]{32}$", "HEX", text, flags=re.M)  # noqa: E731
    ours = pki.make_tls_crypt_key()
    assert skeleton(ours) == skeleton(reference.read_text())
    assert ours.count("\n") == 3 + 1 + 16 + 1 and len(re.findall(r"^[0-9a-f]{32}$", ours, flags=re.M)) == 16


def test_openvpn_loads_the_tls_crypt_key_and_rejects_a_truncated_one(tmp_path):
    key = pki.make_tls_crypt_key()
    test_crypto = ["openvpn", "--test-crypto", "--cipher", "AES-256-CBC", "--verb", "0", "--secret"]
    assert run([*test_crypto, write(tmp_path, "tc.key", key)]).returncode == 0
    truncated = "\n".join(key.splitlines()[:-3] + key.splitlines()[-1:]) + "\n"
    assert run([*test_crypto, write(tmp_path, "bad.key", truncated)]).returncode != 0


def test_every_tls_crypt_key_is_new():
    assert pki.make_tls_crypt_key() != pki.make_tls_crypt_key()


# --- SSH ---------------------------------------------------------------------------------------------------------


def test_ssh_keygen_derives_the_same_public_key_and_fingerprint(tmp_path):
    private_pem, public_line = pki.make_ssh_keypair(comment="lanhub@fridays")
    assert public_line.startswith("ssh-ed25519 AAAA") and public_line.endswith(" lanhub@fridays")
    derived = run(["ssh-keygen", "-y", "-f", write(tmp_path, "id", private_pem)], check=True).stdout.split()
    assert derived[:2] == public_line.split()[:2]
    listed = run(["ssh-keygen", "-l", "-E", "sha256", "-f", write(tmp_path, "id.pub", public_line)], check=True)
    assert listed.stdout.split()[1] == pki.fingerprint_sha256(public_line)


def test_the_public_line_can_be_rebuilt_from_the_stored_private_key():
    private_pem, public_line = pki.make_ssh_keypair(comment="lanhub@fridays")
    assert pki.ssh_public_line(private_pem, "lanhub@fridays") == public_line


def test_a_fingerprint_is_the_same_from_the_wire_blob_and_from_the_line():
    import base64

    _, public_line = pki.make_ssh_keypair(comment="c")
    blob = base64.b64decode(public_line.split()[1])
    assert pki.fingerprint_sha256(blob) == pki.fingerprint_sha256(public_line) == pki.fingerprint_sha256(
        public_line.encode()
    )


def test_a_public_line_whose_type_does_not_match_its_blob_is_refused():
    _, public_line = pki.make_ssh_keypair(comment="c")
    with pytest.raises(ValueError, match="not a ssh-rsa key"):
        pki.fingerprint_sha256(public_line.replace("ssh-ed25519", "ssh-rsa"))
    with pytest.raises(ValueError):
        pki.fingerprint_sha256("ssh-ed25519 not*base64")


@pytest.mark.parametrize("comment", ["", "two\nlines", " padded", "tab\there"])
def test_an_ssh_comment_that_would_break_authorized_keys_is_refused(comment):
    with pytest.raises(ValueError, match="invalid SSH key comment"):
        pki.make_ssh_keypair(comment=comment)
