"""
TLS listeners with client certificates, against a real relay process: a
certificate whose common name may publish does; another is closed with its
name logged; a client without a certificate never gets through.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

from twisted_relay.client import BlockingClient, RelayClientProtocol, relay_service
from twisted_relay.control import control_frame
from twisted_relay.wire import Domain, build_frame

from .helpers import frames_for, free_ports
from .relayprocess import RelayProcess

COMMAND = os.path.join(os.path.dirname(sys.executable), "twisted-relay")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer_key, issuer: str, key, *, ca: bool = False):
    """
    A certificate with the extensions Python 3.13's default context wants
    (it verifies strictly): key identifiers, and the CA's key usage.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: str, name: str, certificate, key) -> tuple[str, str]:
    crt, pem = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    with open(crt, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(pem, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return crt, pem


@pytest.fixture
def pki():
    """A certificate authority, the relay's certificate and two client certificates."""
    directory = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("relay test CA", ca_key, "relay test CA", ca_key, ca=True)
    files = {"ca": _write(directory, "ca", ca, ca_key)}
    for name in ("localhost", "gateway", "intruder"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[name] = _write(directory, name, _certificate(name, ca_key, "relay test CA", key), key)
    yield directory, files
    shutil.rmtree(directory, ignore_errors=True)


def _tls_client(port: int, ca: str, identity: tuple[str, str] | None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca)
    if identity is not None:
        context.load_cert_chain(*identity)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _closed_by_relay(client: ssl.SSLSocket) -> bool:
    """Whether the relay ends the connection (rather than keeping it) within 3 s."""
    client.settimeout(3)
    try:
        while client.recv(65536):
            pass
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionResetError):
        return True
    return True


def test_clientCertificates(pki) -> None:
    """A certificate allowed to publish does, another is closed, no certificate never gets in."""
    directory, files = pki
    (port,) = free_ports(1)
    path = os.path.join(directory, "e.sock")
    server_crt, server_key = files["localhost"]
    relay = RelayProcess(
        directory,
        "--domain", "execution",
        "--listen", f"unix:{path}",
        "--listen",
        f"ssl:{port}:interface=127.0.0.1:privateKey={server_key}:certKey={server_crt}"
        f":caCerts={files['ca'][0]}",
        "--allow-publish", "cn:gateway",
    ).start().wait_listening(2)
    frames = [build_frame(3, 42, seq, [(40, b"o" * 24)]) for seq in (1, 2)]
    try:
        subscriber = BlockingClient(path)
        subscriber.introduce()
        gateway = _tls_client(port, files["ca"][0], files["gateway"])
        gateway.sendall(control_frame(publish_only=True) + frames[0])
        assert [f for _, f in subscriber.receive(1, timeout=10)] == frames[:1]
        assert not _closed_by_relay(gateway)
        gateway.close()

        intruder = _tls_client(port, files["ca"][0], files["intruder"])
        intruder.sendall(control_frame(publish_only=True) + frames[1])
        assert _closed_by_relay(intruder)
        intruder.close()

        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            anonymous = _tls_client(port, files["ca"][0], None)
            anonymous.sendall(frames[1])
            anonymous.settimeout(5)
            anonymous.recv(1)
        assert subscriber.receive(1, timeout=0.5) == []
        subscriber.close()
    finally:
        relay.stop()
    log = relay.log()
    assert re.search(r"certificate CN=gateway", log), log
    assert re.search(r"closing client \d+: 127\.0\.0\.1:\d+ certificate CN=intruder is not allowed to publish", log), log


@pytest.mark.parametrize("interface, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_plainTcpWarning(interface: str, warned: bool) -> None:
    """Plain TCP reachable from other hosts is warned about at start-up; loopback is not."""
    directory = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    relay = RelayProcess(
        directory, "--domain", "signal", "--listen", f"tcp:0:interface={interface}"
    ).start().wait_listening()
    relay.stop()
    log = relay.log()
    shutil.rmtree(directory, ignore_errors=True)
    assert ("is plain TCP on" in log) is warned, log


@pytest_twisted.ensureDeferred
async def test_clientsOverTLS(pki) -> None:
    """
    Both client classes and the CLI speak TLS with a client certificate,
    given as Twisted's client endpoint strings (tls: and ssl:); a file that
    cannot be read is one line.
    """
    directory, files = pki
    (port,) = free_ports(1)
    roots = os.path.join(directory, "roots")
    os.mkdir(roots)
    shutil.copy(files["ca"][0], os.path.join(roots, "ca.pem"))
    server_crt, server_key = files["localhost"]
    relay = RelayProcess(
        directory, "--domain", "execution",
        "--listen",
        f"ssl:{port}:interface=127.0.0.1:privateKey={server_key}:certKey={server_crt}"
        f":caCerts={files['ca'][0]}",
        "--allow-publish", "cn:gateway",
    ).start().wait_listening()
    crt, key = files["gateway"]
    tls = f"tls:host=localhost:port={port}:trustRoots={roots}:certificate={crt}:privateKey={key}"
    ssl_form = f"ssl:localhost:{port}:caCertsDir={roots}:certKey={crt}:privateKey={key}"
    orders = frames_for(Domain.EXECUTION, 6, source=42)
    received: list[bytes] = []
    six: Deferred[None] = Deferred()

    class Subscriber(RelayClientProtocol):
        def frameReceived(self, header, frame) -> None:
            received.append(frame)
            if len(received) == 6:
                six.callback(None)

    service = relay_service(reactor, tls, Factory.forProtocol(Subscriber))
    service.startService()
    try:
        subscriber = await service.whenConnected(failAfterFailures=20)
        await subscriber.account().addTimeout(10, reactor)  # subscribed: it has an account
        with BlockingClient(ssl_form) as publisher:
            publisher.introduce(publish_only=True)
            publisher.publish(b"".join(orders[:3]))
            assert publisher.flush().accepted == 3
        published = await deferToThread(
            subprocess.run,
            [COMMAND, "replay", os.path.join(directory, "audit"), "--to", tls],
            capture_output=True, text=True, timeout=60,
        )
        assert published.returncode == 0, published.stderr
        assert "the relay accepted all 3" in published.stdout
        await six.addTimeout(10, reactor)
        assert received == orders[:3] * 2
        unreadable = await deferToThread(
            subprocess.run,
            [COMMAND, "tap", tls.replace(crt, "/nonexistent.crt"), "--domain", "execution"],
            capture_output=True, text=True, timeout=60,
        )
        assert unreadable.returncode == 1
        assert unreadable.stderr.startswith("twisted-relay: cannot connect to tls:") and (
            "cannot load the TLS files" in unreadable.stderr
        ), unreadable.stderr
    finally:
        try:
            await service.stopService()
        finally:
            relay.stop()
