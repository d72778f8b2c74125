"""Keys and certificates for a real federation.

* ``make_certs``: a private CA plus a server certificate for the SuperLink (TLS).
* ``make_site_keys``: a site's P-384 key pair in OpenSSH format, which Flower's SuperNode
  authentication expects (the coordinator registers the public key; the private key never
  leaves the site).

Everything is written to a temporary folder first and moved into place, so an interrupted run
leaves nothing half-written; existing keys are never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.files import atomic_write

PRIVATE, PUBLIC = 0o600, 0o644

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
CA_KEY = "ca.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbridge federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise ConfigError(f"--cert-host {host!r}: not a host name or IP address") from None
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _publish(out: Path, files: dict[str, tuple[bytes, int]], force: bool) -> None:
    """Write finished files into ``out`` atomically (refusing to overwrite unless forced)."""
    out.mkdir(parents=True, exist_ok=True)
    clash = [n for n in files if (out / n).exists()]
    if clash and not force:
        raise ConfigError(f"{out / clash[0]}: already exists (use --force to replace it)")
    for name, (data, mode) in files.items():
        atomic_write(out / name, data, mode=mode)


def make_certs(
    out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365, force: bool = False
) -> dict[str, Path]:
    """A CA and a SuperLink server certificate valid for ``hosts`` (DNS names or IPs)."""
    if days < 1:
        raise ConfigError(f"--days {days}: must be at least 1")
    hosts = list(hosts) or list(DEFAULT_HOSTS)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedbridge federation CA"))
        .issuer_name(_name("fedbridge federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = {
        CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
        CA_KEY: (_pem_key(ca_key), PRIVATE),
        SERVER_CERT: (server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
        SERVER_KEY: (_pem_key(server_key), PRIVATE),
    }
    _publish(out, files, force)
    return {n: out / n for n in files}


def make_site_keys(out: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A site's EC P-384 key pair (OpenSSH format): ``NAME.key`` (0600) and ``NAME.pub``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"--name {name!r}: use letters, digits, '-', '_' or '.'")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files = {
        f"{name}.key": (private, PRIVATE),
        f"{name}.pub": (public + f" fedbridge-{name}\n".encode(), PUBLIC),
    }
    _publish(out, files, force)
    return out / f"{name}.key", out / f"{name}.pub"


def check_public_key(path: Path) -> None:
    """Refuse a file that is not an OpenSSH EC public key on a NIST curve (what Flower accepts)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{path}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: not an EC public key (make one with `fedbridge site keys`)")


def check_tls_files(paths: Sequence[Path]) -> None:
    """Each TLS file exists and holds PEM data."""
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{p}: TLS file not found (make them with `fedbridge server certs`)")
        if b"-----BEGIN" not in p.read_bytes()[:4096]:
            raise ConfigError(f"{p}: not a PEM file")
