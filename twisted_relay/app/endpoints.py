"""
The endpoints the relay listens on: any Twisted server endpoint string, with
two of the relay's own.

Unix sockets get L{UnixSocketEndpoint}. Twisted's own Unix endpoint binds with
the process umask and chmods afterwards, fails on a stale file left by a
crashed relay, and gives no clear answer when another relay already serves the
path. This one creates the directory, refuses a live relay or a path that is
not a socket, removes a stale socket, and binds with the final mode from the
first instant. Two relays starting at the same instant serialise on a lock of
the directory, so exactly one of them binds.

A Unix socket adopted from systemd (C{systemd:domain=UNIX:name=NAME}) gets
L{AdoptedUnixEndpoint}: the socket file is systemd's, which keeps it bound
across restarts of the relay, so the relay never removes it (Twisted's port
would, at stop).

TLS listeners may require a client certificate, so a relay reached over the
network knows who is on the other end (the certificate's common name, matched
by C{cn:NAME} in the access lists). Twisted's C{ssl:} server endpoint string
takes no certificate authority for clients; the relay adds one parameter to
it, C{caCerts=PATH}, a PEM file of the authorities whose client certificates
it accepts::

    ssl:7003:interface=10.0.0.5:privateKey=relay.key:certKey=relay.crt:caCerts=clients-ca.pem
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import stat
from typing import cast

from twisted.internet import tcp, unix
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    _parse,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IReactorSSL,
    IReactorUNIX,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    trustRootFromCertificates,
)
from zope.interface import implementer

from ..engine.logger import RelayLogger
from ..paths import UntrustedDirectory, check_directory, make_directories


def server_endpoint(
    reactor, description: str, mode: int, strict: bool = True
) -> IStreamServerEndpoint:
    """
    The endpoint for one C{--listen} value: Unix sockets get the safe one,
    C{ssl:} with C{caCerts=} the client-certificate one.

    @raise ValueError: the description is not a usable endpoint.
    """
    if wants_client_certificates(description):
        return client_certificate_endpoint(reactor, description)
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        if description.startswith("systemd:") and isinstance(e, (KeyError, IndexError)):
            raise ValueError(
                "systemd passed this process no such socket (see LISTEN_FDS, "
                "LISTEN_FDNAMES and LISTEN_PID)"
            ) from None
        raise ValueError(str(e)) from None
    if isinstance(endpoint, UNIXServerEndpoint):
        if re.search(r"(^|:)mode=", description):
            raise ValueError("give the socket mode with --mode")
        return UnixSocketEndpoint(reactor, endpoint._address, mode, endpoint._backlog, strict)
    if (
        isinstance(endpoint, AdoptedStreamServerEndpoint)
        and endpoint.addressFamily == socket.AF_UNIX
    ):
        return AdoptedUnixEndpoint(reactor, endpoint.fileno)
    return endpoint


#: How long a probe waits for a busy relay to accept before giving up.
PROBE_TIMEOUT = 1.0


class SocketPathUnavailable(Exception):
    """The socket path is taken, or cannot be inspected."""


@implementer(IStreamServerEndpoint)
class UnixSocketEndpoint:
    log = RelayLogger(namespace="relay")

    def __init__(
        self,
        reactor: IReactorUNIX,
        path: str,
        mode: int = 0o660,
        backlog: int = 50,
        strict: bool = True,
    ) -> None:
        """
        @param strict: refuse a socket directory that another user could
            change (L{check_directory}).
        """
        self._reactor = reactor
        self.path = os.path.abspath(path)
        self.mode = mode
        self.backlog = backlog
        self.strict = strict

    def __repr__(self) -> str:
        return f"unix:{self.path} (mode {self.mode:04o})"

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, protocolFactory: IProtocolFactory) -> IListeningPort:
        directory = self._directory()
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._probe():
                os.unlink(self.path)
                self.log.warn("removed stale socket {path}", path=self.path)
            previous = os.umask(0o777 & ~self.mode)
            try:
                return self._reactor.listenUNIX(
                    self.path, cast(Factory, protocolFactory), backlog=self.backlog, mode=self.mode
                )
            finally:
                os.umask(previous)
        finally:
            os.close(lock)

    def check(self) -> None:
        """
        What L{listen} would refuse, found without binding or removing
        anything (a stale socket stays for L{listen} to remove): for twistd
        to say it before it daemonizes.

        @raise SocketPathUnavailable, OSError: as L{listen} fails.
        """
        self._directory()
        self._probe()

    def _directory(self) -> str:
        """The socket's directory, made if missing and checked."""
        directory = os.path.dirname(self.path)
        make_directories(directory)
        if self.strict:
            try:
                check_directory(directory)
            except UntrustedDirectory as e:
                raise SocketPathUnavailable(
                    f"{e} (--no-strict-dirs overrides this, dangerously)"
                ) from None
        return directory

    def _probe(self) -> bool:
        """
        Whether a stale socket is in the way (nothing answers on it), or
        say why the path must not be touched.
        """
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISSOCK(mode):
            raise SocketPathUnavailable(
                f"{self.path} exists and is not a socket; not touching it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            return True
        except OSError as e:
            raise SocketPathUnavailable(
                f"cannot tell whether {self.path} is in use: {e.strerror or e}"
            ) from e
        else:
            raise SocketPathUnavailable(f"a relay is already listening on {self.path}")
        finally:
            probe.close()


def check_endpoint(endpoint: IStreamServerEndpoint) -> None:
    """
    What listening on C{endpoint} would refuse, found before twistd
    daemonizes and leaving nothing behind: a Unix socket's directory and
    path (L{UnixSocketEndpoint.check}); a TCP or TLS port bound and closed
    at once, as Twisted's port binds it. Other endpoints are not checked.

    @raise Exception: the error listening would fail with.
    """
    if isinstance(endpoint, UnixSocketEndpoint):
        endpoint.check()
        return
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        return
    interface, port = endpoint._interface, endpoint._port
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                address = socket.getaddrinfo(
                    interface, port, 0, 0, 0, socket.AI_NUMERICHOST
                )[0][4]
            else:
                address = (interface, port)
            trial.bind(address)
    except OSError as e:
        raise CannotListenError(interface, port, e) from None


class _AdoptedUnixPort(unix.Port):
    """
    A listening Unix socket systemd bound and keeps: at stop, the relay
    closes its own descriptor and nothing more. A shutdown() would stop the
    socket listening for systemd as well (Twisted skips it for adopted TCP
    ports only), and unix.Port would unlink the file.
    """

    _shouldShutdown = False

    def connectionLost(self, reason):
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class AdoptedUnixEndpoint:
    """
    A listening Unix socket inherited from systemd (socket activation): the
    relay accepts on it and closes its own descriptor at stop; the file and
    the socket stay systemd's, for the next start of the relay.
    """

    def __init__(self, reactor: IReactorSocket, fileno: int) -> None:
        """@raise ValueError: C{fileno} is not a socket."""
        self._reactor = reactor
        self.fileno = fileno
        try:
            with socket.fromfd(fileno, socket.AF_UNIX, socket.SOCK_STREAM) as bound:
                self.path = os.fsdecode(bound.getsockname())
        except OSError as e:
            raise ValueError(f"descriptor {fileno} from systemd: {e.strerror or e}") from None

    def __repr__(self) -> str:
        return f"systemd socket {self.fileno} (unix:{self.path})"

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, protocolFactory: IProtocolFactory) -> IListeningPort:
        os.set_blocking(self.fileno, False)
        port = _AdoptedUnixPort._fromListeningDescriptor(
            self._reactor, self.fileno, protocolFactory
        )
        if self.path.startswith("/"):
            # unix.Port chmods the file as it starts: to the mode it has (SocketMode=).
            port.mode = stat.S_IMODE(os.stat(self.path).st_mode)
        port.startListening()
        # The port listens on its own duplicate; this one is not needed now.
        os.close(self.fileno)
        return port


CA_CERTS = "caCerts"
#: The ssl: parameters a client-certificate listener takes.
_SUPPORTED = {"port", "interface", "backlog", "privateKey", "certKey", CA_CERTS}
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def wants_client_certificates(description: str) -> bool:
    return description.startswith("ssl:") and f"{CA_CERTS}=" in description


def client_certificate_endpoint(reactor: IReactorSSL, description: str) -> SSL4ServerEndpoint:
    """
    The endpoint for an C{ssl:} description with C{caCerts=PATH}: its
    handshake fails for a client without a certificate signed by one of
    those authorities.

    @raise ValueError: a parameter is missing, unknown or unreadable.
    """
    args, kwargs = _parse(description)
    if len(args) > 1:
        kwargs.setdefault("port", args[1])
    unknown = set(kwargs) - _SUPPORTED
    if unknown:
        raise ValueError(
            f"{', '.join(sorted(unknown))} cannot be combined with {CA_CERTS}= "
            f"(supported: {', '.join(sorted(_SUPPORTED))})"
        )
    if "port" not in kwargs:
        raise ValueError("no port given")
    private_key = kwargs.get("privateKey", "server.pem")
    try:
        with open(kwargs.get("certKey", private_key), "rb") as f:
            certificate = f.read()
        with open(private_key, "rb") as f:
            key = f.read()
        with open(kwargs[CA_CERTS], "rb") as f:
            authorities = _PEM_CERTIFICATE.findall(f.read())
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    if not authorities:
        raise ValueError(f"{kwargs[CA_CERTS]} holds no PEM certificate")
    own = PrivateCertificate.loadPEM(certificate + b"\n" + key)
    options = CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        # A trust root makes the server ask for, and require, a client certificate.
        trustRoot=trustRootFromCertificates([Certificate.loadPEM(pem) for pem in authorities]),
    )
    return SSL4ServerEndpoint(
        reactor,
        int(kwargs["port"]),
        options,
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )
