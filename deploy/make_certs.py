"""Create the TLS certificates and SuperNode keys of a Flower deployment.

Writes into ``OUT_DIR``:

``ca.crt``, ``ca.key``
    A self-signed certificate authority. ``ca.crt`` goes to every SuperNode
    (``--root-certificates``) and to every machine that runs ``flwr``;
    ``ca.key`` stays with whoever issues certificates.
``server.crt``, ``server.key``
    The SuperLink's certificate, signed by the CA, valid for ``localhost``,
    ``127.0.0.1`` and every ``--host`` given (DNS names or IP addresses).
``supernode-<i>``, ``supernode-<i>.pub``
    One EC P-384 key pair per SuperNode in OpenSSH format: the private key
    goes to SuperNode ``i`` (``--auth-supernode-private-key``), the public key
    is registered at the SuperLink (``flwr supernode register``).

Running it again on the same directory reuses the CA (so SuperNodes keep
trusting it), issues a fresh server certificate (e.g. for new ``--host``
names) and creates only the SuperNode keys that do not exist yet: a key that
may already be registered is never replaced.

Usage::

    python -m deploy.make_certs OUT_DIR --supernodes N [--host NAME ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825


@dataclass(frozen=True)
class DeploymentFiles:
    """Paths of the files :func:`make_certs` wrote (all absolute).

    Attributes
    ----------
    ca_cert, ca_key : Path
        The certificate authority.
    server_cert, server_key : Path
        The SuperLink's TLS certificate and key.
    supernode_keys : tuple of Path
        The private key of SuperNode ``i`` at index ``i``; its public key is
        ``public_key_path(supernode_keys[i])``.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: tuple[Path, ...]


def public_key_path(private_key: Path) -> Path:
    """The OpenSSH public key written next to ``private_key`` (``<name>.pub``)."""
    return private_key.with_name(private_key.name + ".pub")


def supernode_key_path(out_dir: Path, index: int) -> Path:
    """Where the private key of SuperNode ``index`` lives in ``out_dir``."""
    return out_dir / f"supernode-{index}"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path``; private files are readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)  # an existing file keeps its mode through os.open


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "resist-fl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    """SANs for ``hosts``: an IP address entry where the name parses as one, else DNS."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # unique, order kept
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, signing_key: ec.EllipticCurvePrivateKey,
                 days: int, extensions: Sequence[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """A certificate for ``public_key`` signed (SHA-384) by ``signing_key``."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def load_or_create_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA of ``out_dir``: read from ``ca.crt``/``ca.key`` if both exist, else created.

    Parameters
    ----------
    out_dir : Path
        Directory holding (or receiving) ``ca.crt`` and ``ca.key``.

    Returns
    -------
    tuple
        The CA certificate and its private key.
    """
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key
    key = _new_key()
    name = _name("resist-fl CA")
    cert = _certificate(name, key.public_key(), name, key, CA_VALID_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
    ])
    _write(key_path, _pem_private(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def write_server_certificate(out_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                             hosts: Iterable[str] = ()) -> tuple[Path, Path]:
    """Issue the SuperLink's certificate for ``localhost``, ``127.0.0.1`` and ``hosts``.

    Parameters
    ----------
    out_dir : Path
        Where ``server.crt`` and ``server.key`` are written (replacing old ones).
    ca_cert, ca_key
        The issuing CA.
    hosts : iterable of str
        Extra DNS names or IP addresses SuperNodes and ``flwr`` use to reach
        the SuperLink.

    Returns
    -------
    tuple of Path
        The certificate and key paths.
    """
    extra = list(hosts)
    key = _new_key()
    cert = _certificate(_name(extra[0] if extra else "localhost"), key.public_key(), ca_cert.subject,
                        ca_key, SERVER_VALID_DAYS, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_cert_sign=False, crl_sign=False,
                       encipher_only=False, decipher_only=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (_subject_alt_names([*DEFAULT_HOSTS, *extra]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    _write(key_path, _pem_private(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def write_supernode_key(path: Path, comment: str | None = None) -> Path:
    """Create an EC P-384 key pair in OpenSSH format at ``path`` and ``path.pub``.

    This is the key type Flower's SuperNode authentication accepts (a NIST
    curve, OpenSSH encoding). An existing key is kept as it is.

    Parameters
    ----------
    path : Path
        The private key file (mode 0600); the public key goes to ``<path>.pub``.
    comment : str, optional
        Comment appended to the public key line (default: the file name).

    Returns
    -------
    Path
        ``path``.
    """
    if path.exists() and public_key_path(path).exists():
        return path
    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(path, private, private=True)
    _write(public_key_path(path), public + f" {comment or path.name}\n".encode())
    return path


def make_certs(out_dir: str | os.PathLike, num_supernodes: int, hosts: Iterable[str] = ()) -> DeploymentFiles:
    """Create (or complete) the CA, the SuperLink certificate and ``num_supernodes`` key pairs.

    Parameters
    ----------
    out_dir : path-like
        Output directory (created if missing).
    num_supernodes : int
        Number of SuperNode key pairs ``supernode-0`` ... ``supernode-<N-1>``.
    hosts : iterable of str
        Extra names or addresses of the SuperLink for the certificate's SANs.

    Returns
    -------
    DeploymentFiles
        The absolute paths of everything written.
    """
    if num_supernodes < 0:
        raise ValueError(f"num_supernodes must be >= 0, got {num_supernodes}")
    out = Path(out_dir).expanduser().resolve()
    ca_cert, ca_key = load_or_create_ca(out)
    server_cert, server_key = write_server_certificate(out, ca_cert, ca_key, hosts)
    keys = tuple(write_supernode_key(supernode_key_path(out, i)) for i in range(num_supernodes))
    return DeploymentFiles(out / CA_CERT, out / CA_KEY, server_cert, server_key, keys)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m deploy.make_certs OUT_DIR --supernodes N [--host NAME ...]``."""
    parser = argparse.ArgumentParser(prog="python -m deploy.make_certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--supernodes", type=int, required=True, help="number of SuperNode key pairs")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="DNS name or IP address of the SuperLink (repeatable); "
                             "localhost and 127.0.0.1 are always included")
    args = parser.parse_args(argv)
    files = make_certs(args.out_dir, args.supernodes, args.host)
    print(f"CA:        {files.ca_cert}  (keep {files.ca_key.name} private)")
    print(f"SuperLink: {files.server_cert}, {files.server_key}  "
          f"(SANs: {', '.join(dict.fromkeys([*DEFAULT_HOSTS, *args.host]))})")
    for i, key in enumerate(files.supernode_keys):
        print(f"SuperNode {i}: {key} (private), {public_key_path(key)} (register)")


if __name__ == "__main__":
    main()
