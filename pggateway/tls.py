"""The gateway's TLS material: its own CA and server certificate, made once at first start.

Clients verify the gateway with `sslmode=verify-full sslrootcert=<data_dir>/pggateway/ca.crt`, so
the CA is stable across restarts (made once, reused) and the server certificate names every
host a client may dial: localhost, 127.0.0.1, ::1 and `public_pg_host`. An operator who has a
real certificate sets CTRLMESH_PG_TLS_CERT and CTRLMESH_PG_TLS_KEY and nothing is generated.

ECDSA P-256 keys: the handshake is a large share of a short-lived connection's cost, and ECDSA
signs an order of magnitude faster than RSA-2048.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("ctrlmesh.pggateway.tls")

# The largest plaintext the gateway puts in one TLS record towards a client. libpq makes room for
# at least 8 KiB before every read and, in non-blocking mode (psycopg, every async driver built
# on libpq), returns to the caller after one SSL_read. A larger record (OpenSSL's default is 16 KiB)
# is then only partly read: the rest waits decrypted inside OpenSSL while the socket is empty, so
# the application's wait for readability never ends (libpq before 18 has no check of
# SSL_pending there). PostgreSQL itself never sends more than 8 KiB per SSL_write, which is why
# the same clients never hang against it directly; the gateway keeps to the same bound.
TLS_RECORD_PLAINTEXT = 8192


def write_records(transport: asyncio.WriteTransport, data: bytes | bytearray | memoryview) -> None:
    """Write `data` so that no TLS record carries more than TLS_RECORD_PLAINTEXT bytes.

    Both asyncio's and uvloop's TLS transports turn each buffer given to `writelines` into its
    own SSL_write, and one SSL_write of at most 16 KiB is one record.
    """
    size = len(data)
    if size <= TLS_RECORD_PLAINTEXT:
        transport.write(data)
        return
    view = memoryview(data)
    transport.writelines([view[i : i + TLS_RECORD_PLAINTEXT] for i in range(0, size, TLS_RECORD_PLAINTEXT)])


CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class TlsMaterial:
    cert_path: Path
    key_path: Path
    # The CA clients should trust; None when the operator supplied the certificate.
    ca_path: Path | None


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ctrlmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ctrlmesh PG Gateway CA"))
        .issuer_name(_name("ctrlmesh PG Gateway CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), 0o600)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated the PG Gateway CA in %s", directory)
    return cert, key


def _make_server_cert(
    directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / SERVER_KEY, _key_pem(key), 0o600)
    _write(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated the PG Gateway server certificate for %s", ", ".join(hosts))


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    """Whether an existing server certificate still names every host and is not near expiry."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in names.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in names.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=30)
    return fresh and all(h in have for h in hosts if h)


def ensure_material(
    data_dir: Path, public_host: str, cert: Path | None = None, key: Path | None = None
) -> TlsMaterial:
    """The certificate to serve: the operator's, or ours under `<data_dir>/pggateway/` (made on
    first start; the server certificate is re-issued by the same CA if a host was added)."""
    if cert is not None and key is not None:
        return TlsMaterial(Path(cert), Path(key), None)
    if (cert is None) != (key is None):
        raise ValueError("set both CTRLMESH_PG_TLS_CERT and CTRLMESH_PG_TLS_KEY, or neither")
    directory = data_dir / "pggateway"
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)  # ca.crt must be readable by the user's tools
    hosts = list(dict.fromkeys(h for h in ("localhost", "127.0.0.1", "::1", public_host) if h))
    if (directory / CA_CERT).exists() and (directory / CA_KEY).exists():
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        loaded = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY} is not an EC key")
        ca_key = loaded
    else:
        ca_cert, ca_key = _make_ca(directory)
    server_cert = directory / SERVER_CERT
    if not ((directory / SERVER_KEY).exists() and _covers(server_cert, hosts)):
        _make_server_cert(directory, ca_cert, ca_key, hosts)
    return TlsMaterial(server_cert, directory / SERVER_KEY, directory / CA_CERT)


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(material.cert_path, material.key_path)
    # PostgreSQL clients never send ALPN "postgresql" before v17's direct TLS; don't demand it.
    return ctx


def channel_binding_data(cert_path: Path) -> bytes:
    """The tls-server-end-point binding (RFC 5929): a hash of our certificate, with the hash of
    its signature algorithm (SHA-256 for MD5 and SHA-1)."""
    pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    algo = cert.signature_hash_algorithm
    name = algo.name if algo is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, cert.public_bytes(serialization.Encoding.DER)).digest()
