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
import socket
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


def this_host() -> list[str]:
    """This machine's own names (FQDN and short host name), for the certificate's SAN."""
    names = [socket.getfqdn(), socket.gethostname()]
    return [n for n in dict.fromkeys(names) if n and n != "localhost" and n[-1:] != "."]


def default_hosts(extra: Sequence[str] = ()) -> list[str]:
    """The names a SuperLink certificate covers: ``extra`` (``--cert-host``, first, so the
    real host name is the subject), this machine's names, then loopback."""
    return list(dict.fromkeys([*extra, *this_host(), *DEFAULT_HOSTS]))


def fingerprint(cert: Path) -> str:
    """SHA-256 of a PEM certificate (``AB:CD:…``), to compare over a second channel."""
    try:
        loaded = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except OSError as e:
        raise ConfigError(f"{cert}: cannot read ({e.strerror})") from None
    except ValueError:
        raise ConfigError(f"{cert}: not a PEM certificate") from None
    return loaded.fingerprint(hashes.SHA256()).hex(":").upper()


def _ca(days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
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
    return ca_key, ca_cert


def _load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    except OSError as e:
        raise ConfigError(f"{out}: no CA to renew with ({e.filename}: {e.strerror})") from None
    except ValueError:
        raise ConfigError(f"{out}: {CA_CERT} or {CA_KEY} is not PEM") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{out / CA_KEY}: not the EC key `fedbridge server certs` writes")
    return key, cert


def make_certs(
    out: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
    *,
    ca_days: int = 3650,
    renew: bool = False,
) -> dict[str, Path]:
    """A CA and a SuperLink server certificate valid for ``hosts`` (DNS names or IPs).

    ``renew``: keep the CA in ``out`` (the sites' ``ca.crt`` and its fingerprint stay the same)
    and issue a new server certificate only.
    """
    if days < 1 or ca_days < 1:
        raise ConfigError(f"--days {min(days, ca_days)}: must be at least 1")
    hosts = list(hosts) or list(DEFAULT_HOSTS)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _load_ca(out) if renew else _ca(ca_days, now)
    if renew and ca_cert.not_valid_after_utc < now + dt.timedelta(days=days):
        raise ConfigError(
            f"{out / CA_CERT}: the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before "
            f"a {days}-day server certificate would; make a new CA (without --renew)"
        )
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
        SERVER_CERT: (server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
        SERVER_KEY: (_pem_key(server_key), PRIVATE),
    }
    if not renew:
        files = {
            CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC),
            CA_KEY: (_pem_key(ca_key), PRIVATE),
            **files,
        }
    _publish(out, files, force or renew)
    return {n: out / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}


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
