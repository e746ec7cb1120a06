"""Throw-away TLS material for tests: a CA, a server certificate it signed, and an unrelated CA.

Everything is generated in process with ``cryptography`` (no ``openssl`` CLI needed)::

    material = make_tls_material(tmp_path / "tls")
    # material.ca_cert        CA certificate (self-signed, CA:true) that clients should trust
    # material.ca_key         its private key (0600), for signing more certificates if needed
    # material.server_cert    leaf for 127.0.0.1 (IP SAN) and localhost (DNS SAN), signed by the CA
    # material.server_key     its private key (0600)
    # material.other_ca_cert  a second, unrelated CA: trusting it must fail verification

Keys are ECDSA P-256 (generation takes about a millisecond, unlike RSA), certificates are
valid from one hour ago for 30 days, and every certificate carries the subject and authority
key identifiers that strict verifiers (``VERIFY_X509_STRICT``, the default from Python 3.13)
insist on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_HOSTS = ("127.0.0.1", "localhost")
VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of the PEM files written by :func:`make_tls_material`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path


def make_tls_material(directory: Path | str) -> TlsMaterial:
    """Write a CA, a server certificate signed by it and an unrelated CA into ``directory``
    (created if missing) as PEM files; private keys are written with mode 0600."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _make_ca("grantkeeper test CA")
    _other_key, other_ca_cert = _make_ca("grantkeeper unrelated test CA")
    server_key, server_cert = _make_server_cert(ca_key, ca_cert)

    material = TlsMaterial(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        other_ca_cert=directory / "other-ca.pem",
    )
    _write_cert(material.ca_cert, ca_cert)
    _write_key(material.ca_key, ca_key)
    _write_cert(material.server_cert, server_cert)
    _write_key(material.server_key, server_key)
    _write_cert(material.other_ca_cert, other_ca_cert)
    return material


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(hours=1), now + VALIDITY


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "grantkeeper tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before, not_after = _validity()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    not_before, not_after = _validity()
    san = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # also when the file already existed with wider bits
        out.write(pem)
