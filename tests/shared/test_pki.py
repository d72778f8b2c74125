"""Certificates: the real host name in the SAN, the CA fingerprint printed for an out-of-band
check (and shown again by `site join`), and renewal that keeps the sites' ca.crt."""

import socket
import ssl
import subprocess

from cli import assert_one_line_error, fedbridge, ok
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fedbridge_shared import pki


def _san(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert, cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_certs_carry_this_host_and_print_the_ca_fingerprint_that_openssl_computes(tmp_path):
    out = tmp_path / "certs"
    text = ok("server", "certs", "--out", out, "--cert-host", "coord.hospital.example").stdout
    cert, san = _san(out / pki.SERVER_CERT)
    names = san.get_values_for_type(x509.DNSName)
    assert names[0] == "coord.hospital.example" and "localhost" in names
    assert socket.gethostname() in names  # the machine's real name, without --cert-host
    assert cert.subject.rfc4514_string().startswith("CN=coord.hospital.example")
    openssl = subprocess.run(
        ["openssl", "x509", "-in", out / pki.CA_CERT, "-noout", "-fingerprint", "-sha256"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    printed = openssl.strip().split("=", 1)[1]
    assert f"CA SHA-256 fingerprint: {printed}" in text.replace("\n", " ")
    # the server certificate verifies against the CA for the real host name
    context = ssl.create_default_context(cafile=str(out / pki.CA_CERT))
    assert context.get_ca_certs()[0]["subject"]
    ca = x509.load_pem_x509_certificate((out / pki.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)


def test_renew_issues_a_new_server_certificate_under_the_same_ca(tmp_path):
    out = tmp_path / "certs"
    ok("server", "certs", "--out", out, "--days", "30")
    ca_before = (out / pki.CA_CERT).read_bytes()
    old, _ = _san(out / pki.SERVER_CERT)
    text = ok("server", "certs", "--out", out, "--renew", "--days", "400").stdout
    assert (out / pki.CA_CERT).read_bytes() == ca_before  # the sites keep their ca.crt
    new, _ = _san(out / pki.SERVER_CERT)
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc > old.not_valid_after_utc
    new.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    fp = x509.load_pem_x509_certificate(ca_before).fingerprint(hashes.SHA256()).hex(":").upper()
    assert fp in text.replace("\n", " ")
    # making a new CA over an existing one needs --force; renewing without a CA is refused
    assert_one_line_error(fedbridge("server", "certs", "--out", out), "already exists")
    empty = tmp_path / "none"
    assert_one_line_error(
        fedbridge("server", "certs", "--out", empty, "--renew"), "no CA to renew with"
    )
    assert not empty.exists() or not any(empty.iterdir())
