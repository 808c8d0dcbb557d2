"""
Clients of the relay: a Twisted protocol for services, a reconnecting service
around it, and a small blocking client for scripts. All of them cut the stream
with the relay's own L{Framer}, take the relay's heartbeats and recovery
answers out of it, and treat three heartbeat intervals of silence as a dead
relay.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from typing import cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .control import (
    REPLAYING,
    Account,
    account_frame,
    control_frame,
    parse_account,
    parse_error,
    parse_heartbeat,
    parse_recovery_response,
    parse_relay_info,
    recovery_frame,
)
from .domains import MARKET
from .framing import Framer
from .wire import HEADER_SIZE, Domain, FramingLost, Header

__all__ = [
    "Account",
    "BlockingClient",
    "DEFAULT_MAX_FRAME",
    "Incoming",
    "MISSED_HEARTBEATS",
    "PublishRefused",
    "RelayClientProtocol",
    "RelayClosed",
    "RelayDead",
    "relay_service",
]

#: The largest frame any shipped domain carries (market data).
DEFAULT_MAX_FRAME = MARKET.max_frame_size
#: Heartbeat intervals of silence after which the relay is taken for dead.
MISSED_HEARTBEATS = 3
#: Seconds the blocking client waits for a TCP connection and a TLS handshake.
CONNECT_TIMEOUT = 10.0


class RelayDead(ConnectionError):
    """The relay sent nothing, not even a heartbeat, for three intervals."""


class RelayClosed(ConnectionError):
    """
    The relay closed the connection; C{error}: the reason it gave, if it
    gave one (its Error frame: the reason as counted, and what happened).
    """

    def __init__(self, error: tuple[str, str] | None) -> None:
        self.error = error
        told = f": {error[1]} ({error[0]})" if error else ""
        super().__init__(f"the relay closed the connection{told}")


class PublishRefused(Exception):
    """
    The relay refused frames published since the last flush: C{account}
    holds the counts of that stretch, C{refused} by reason.
    """

    def __init__(self, account: Account) -> None:
        self.account = account
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(account.refused.items()))
        super().__init__(
            f"the relay refused {account.refusals:,} of the frames published ({reasons}); "
            f"{account.accepted:,} accepted"
        )


#: The relay_domain of the relay's own frames (L{control.is_control}), as a plain int.
_SYSTEM = int(Domain.SYSTEM)
#: What L{Incoming.deliver} returns for a frame the application does not get now.
_NOTHING: tuple[tuple[Header, bytes], ...] = ()


class Incoming:
    """
    Sorts what the relay sends: heartbeats, recovery answers, accounts and
    the relay's other frames are taken out of the stream. Live frames of a source being recovered that arrive
    before the relay's answer are held: if a replay follows the answer it
    carries them again, in order, and they are dropped; otherwise they are
    delivered when the answer comes.
    """

    log = Logger()

    def __init__(
        self,
        onAccount: Callable[[Account], None] = lambda account: None,
        onRelayFrame: Callable[[Header, bytes], None] = lambda header, frame: None,
    ) -> None:
        """
        @param onAccount: called with each answer to an account request.
        @param onRelayFrame: called with each frame the relay made itself
            (system domain), once it has been taken in: for clients that
            want them too.
        """
        self.onAccount = onAccount
        self.onRelayFrame = onRelayFrame
        #: The relay's latest answer to an account request.
        self.account: Account | None = None
        #: Why the relay closed the connection, if it said: C{(reason, detail)}.
        self.error: tuple[str, str] | None = None
        #: Bytes of a frame the connection ended in the middle of, discarded.
        self.torn = 0
        #: The relay's heartbeat interval, once a heartbeat came.
        self.heartbeat_interval: float | None = None
        #: The last sequence per source, from the latest heartbeat.
        self.last_sequences: dict[int, int] = {}
        #: First sequence wanted per source, until the relay answers.
        self.recovering: dict[int, int] = {}
        #: The relay's answers: (source, first sequence, status).
        self.answers: list[tuple[int, int, int]] = []
        #: The relay's C{(relay_domain, name)}, from its latest RelayInfo.
        self.relay_info: tuple[int, str] | None = None
        #: The relay's RelayInfo answers so far, and its other system frames.
        self.relay_infos = 0
        self.other_system_frames = 0
        self.heartbeats = 0
        self._held: dict[int, list[tuple[Header, bytes]]] = {}

    def feed(self, framer: Framer, data: bytes) -> Iterator[tuple[Header, bytes]]:
        """
        The C{(header, frame)} pairs the application gets from C{data}, cut
        into frames by C{framer}.

        @raise FramingLost: the stream cannot be cut into frames.
        """
        for buf, start, header in framer.frames(data):
            yield from self.deliver(header, buf[start : start + HEADER_SIZE + header.payload_size])

    def ended(self, framer: Framer) -> None:
        """
        The connection ended: a frame it stopped in the middle of (the relay
        cut this client off, or the connection broke) is discarded, never
        delivered in part, and said so.
        """
        self.torn = framer.buffered
        if self.torn:
            self.log.warn(
                "the connection to the relay ended in the middle of a frame: its "
                "{torn} bytes received were discarded",
                torn=self.torn,
            )

    def deliver(self, header: Header, frame: bytes) -> tuple[tuple[Header, bytes], ...]:
        """The C{(header, frame)} pairs the application gets now, in order."""
        if header.relay_domain == _SYSTEM:
            try:
                return self._relayFrame(header, frame)
            finally:
                self.onRelayFrame(header, frame)
        if self.recovering:
            first = self.recovering.get(header.source)
            if first is not None and header.sequence >= first:
                self._held.setdefault(header.source, []).append((header, frame))
                return _NOTHING
        return ((header, frame),)

    def _relayFrame(self, header: Header, frame: bytes) -> tuple[tuple[Header, bytes], ...]:
        """Take in a frame the relay made; what the application gets now (held frames)."""
        beat = parse_heartbeat(header, frame)
        if beat is not None:
            self.heartbeat_interval, self.last_sequences = beat
            self.heartbeats += 1
            return _NOTHING
        answer = parse_recovery_response(header, frame)
        if answer is not None:
            source, _, status = answer
            self.recovering.pop(source, None)
            self.answers.append(answer)
            held = self._held.pop(source, [])
            return _NOTHING if status == REPLAYING else tuple(held)
        info = parse_relay_info(header, frame)
        account = None if info is not None else parse_account(header, frame)
        error = None if info or account else parse_error(header, frame)
        if info is not None:
            self.relay_info = info
            self.relay_infos += 1
        elif account is not None:
            self.account = account
            self.onAccount(account)
        elif error is not None:
            self.error = error
            self.log.warn(
                "the relay is closing the connection: {detail} ({reason})",
                reason=error[0],
                detail=error[1],
            )
        else:
            self.other_system_frames += 1
        return _NOTHING  # the relay's own frames are never the application's


class Declaring:
    """What a client says to the relay about itself, over its C{publish}."""

    def publish(self, frame: bytes) -> None:
        raise NotImplementedError

    incoming: Incoming
    #: The tokens of account requests, set up with the connection.
    _tokens: Iterator[int]
    #: The account the last flush checked against.
    _flushed: Account | None = None

    def ask_account(self) -> int:
        """
        Ask for the connection's account without waiting for it: the answer
        becomes C{incoming.account} (and is given to C{incoming.onAccount}).
        Returns the token the answer carries.
        """
        token = next(self._tokens)
        self.publish(account_frame(token))
        return token

    def _checkFlush(self, account: Account) -> Account:
        """
        The counts since the last flush, from its answer C{account}.

        @raise PublishRefused: the relay refused some of the frames.
        """
        since, self._flushed = account.since(self._flushed), account
        if since.refusals:
            raise PublishRefused(since)
        return since

    def declare(
        self,
        *,
        publish_only: bool = False,
        sources: Iterable[int] | None = None,
        tlv_types: Iterable[int] | None = None,
    ) -> None:
        """Tell the relay what this connection receives (see docs/delivery.md)."""
        self.publish(control_frame(publish_only=publish_only, sources=sources, tlv_types=tlv_types))

    def recover(self, wanted: dict[int, int]) -> None:
        """
        Ask the relay to replay each source of C{wanted} from the sequence
        given (see docs/execution.md); the frames follow in the stream.
        """
        self.incoming.recovering.update(wanted)
        self.publish(recovery_frame(wanted))


class RelayClientProtocol(Declaring, Protocol):
    """
    One connection to a relay. Override L{frameReceived}; send with
    L{publish}; say what to receive with L{declare}.
    """

    log = Logger()
    max_frame_size = DEFAULT_MAX_FRAME
    clock: IReactorTime | None = None
    _silence: IDelayedCall | None = None
    #: Set by Twisted before C{connectionMade}.
    transport: ITransport

    def connectionMade(self) -> None:
        self._framer = Framer(self.max_frame_size)
        self._tokens = count(1)
        self._accounts: dict[int, Deferred[Account]] = {}
        self.incoming = Incoming(
            onAccount=self._accountReceived, onRelayFrame=self.relayFrameReceived
        )
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor

    def dataReceived(self, data: bytes) -> None:
        try:
            for delivered in self.incoming.feed(self._framer, data):
                self.frameReceived(*delivered)
        except FramingLost as error:
            self.log.error("relay stream unreadable, closing: {error}", error=str(error))
            self.transport.loseConnection()
        self._heard()

    def _heard(self) -> None:
        """Something came: the relay is alive for three more heartbeat intervals."""
        interval = self.incoming.heartbeat_interval
        if not interval:
            return
        if self._silence is not None and self._silence.active():
            self._silence.reset(interval * MISSED_HEARTBEATS)
        else:
            assert self.clock is not None
            self._silence = self.clock.callLater(interval * MISSED_HEARTBEATS, self._dead)

    def _dead(self) -> None:
        assert self.incoming.heartbeat_interval is not None
        self.log.warn(
            "nothing from the relay for {seconds:g}s ({missed} heartbeat intervals): "
            "taking it for dead and disconnecting",
            seconds=self.incoming.heartbeat_interval * MISSED_HEARTBEATS,
            missed=MISSED_HEARTBEATS,
        )
        cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self.incoming.ended(self._framer)
        waiting, self._accounts = self._accounts, {}
        for deferred in waiting.values():
            deferred.errback(RelayClosed(self.incoming.error))

    def account(self, timeout: float | None = None) -> Deferred[Account]:
        """
        This connection's account: fires once the relay has taken (or
        refused) everything published before, with its counts since the
        connection was made; fails with L{RelayClosed} if the connection is
        lost first, and with L{twisted.internet.defer.TimeoutError} after
        C{timeout} seconds if given.
        """
        waiting: Deferred[Account] = Deferred()
        token = self.ask_account()
        self._accounts[token] = waiting
        if timeout is not None:
            assert self.clock is not None

            def forget(result: object) -> object:
                self._accounts.pop(token, None)
                return result

            waiting.addTimeout(timeout, self.clock).addBoth(forget)
        return waiting

    def flush(self, timeout: float | None = None) -> Deferred[Account]:
        """
        Like L{account}, the counts since the previous flush; fails with
        L{PublishRefused} if the relay refused any of those frames.
        """
        return self.account(timeout).addCallback(self._checkFlush)

    def _accountReceived(self, account: Account) -> None:
        waiting = self._accounts.pop(account.token, None)
        if waiting is not None:
            waiting.callback(account)

    def frameReceived(self, header: Header, frame: bytes) -> None:
        """A whole frame arrived: C{frame} is its exact bytes."""

    def relayFrameReceived(self, header: Header, frame: bytes) -> None:
        """
        A frame the relay made itself arrived (a heartbeat, an answer, its
        Error frame), already taken in (C{incoming}); never given to
        L{frameReceived}. Override to see them.
        """

    def publish(self, frame: bytes) -> None:
        """Send one or more whole frames to the relay."""
        self.transport.write(frame)


def endpoint_string(address: str) -> str:
    """
    C{address} as a Twisted client endpoint string: a bare socket path
    (C{/tmp/torq/market_data.sock}) is short for C{unix:path=...}; any
    endpoint string is kept as it is.
    """
    if ":" not in address.split("/", 1)[0] or address.startswith(("/", ".")):
        return "unix:path=" + address.replace("\\", "\\\\").replace(":", "\\:")
    return address


def _fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint string's type, positional arguments and named ones (Twisted's syntax)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind, positional, named = parts[0], [], {}
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals and key.isidentifier():
            named[key] = value
        else:
            positional.append(part)
    return kind, positional, named


def socket_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """
    The socket family and address of C{address} (a socket path, or a
    C{unix:}, C{tcp:}, C{tls:} or C{ssl:} endpoint string, positional or
    named arguments).

    @raise ValueError: with one line saying what is wrong with it.
    """
    kind, positional, named = _fields(endpoint_string(address))
    if kind == "unix":
        path = named.get("path") or (positional[0] if positional else "")
        if not path:
            raise ValueError(f"{address} names no socket path: give unix:path=PATH")
        return socket.AF_UNIX, path
    if kind in _NETWORK:
        host = named.get("host") or (positional[0] if positional else "")
        port = named.get("port") or (positional[1] if len(positional) > 1 else "")
        if not host or not port.isdigit():
            raise ValueError(
                f"{address} needs a host and a port: give {kind}:host=HOST:port=PORT or "
                f"{kind}:HOST:PORT"
            )
        return socket.AF_INET, (host, int(port))
    raise ValueError(f"{address}: endpoint type {kind!r} is not one of unix, tcp, tls, ssl")


#: The endpoint types on a network, and for TLS, the names of their arguments
#: (as Twisted's client endpoints take them): trust roots, certificate.
_NETWORK = {"tcp": None, "tls": ("trustRoots", "certificate"), "ssl": ("caCertsDir", "certKey")}


def tls_context(address: str) -> ssl.SSLContext | None:
    """
    The TLS context for a C{tls:} or C{ssl:} endpoint string, as Twisted's
    client endpoints read their arguments (C{None} for any other address):
    the relay's certificate is checked against the C{.pem} files of the
    C{trustRoots} (C{caCertsDir}) directory, or for C{tls:} without one the
    system's authorities; C{ssl:} without one checks nothing, as Twisted's
    does. C{certificate} (C{certKey}) and C{privateKey} are this client's.

    @raise ValueError: a file cannot be read, with one line saying which.
    """
    kind, _, named = _fields(endpoint_string(address))
    if kind not in ("tls", "ssl"):
        return None
    roots_name, certificate_name = cast("tuple[str, str]", _NETWORK[kind])
    roots, certificate = named.get(roots_name), named.get(certificate_name)
    try:
        if roots:
            pems = [
                entry.path for entry in os.scandir(roots) if entry.name.lower().endswith(".pem")
            ]
            if not pems:
                raise ValueError(f"{roots_name}={roots} holds no .pem file of authorities")
            context = ssl.create_default_context(
                cadata="".join(pathlib.Path(path).read_text() for path in sorted(pems))
            )
        else:
            context = ssl.create_default_context()
            if kind == "ssl":
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        if kind == "ssl":  # Twisted's ssl: checks the chain only, not the name
            context.check_hostname = False
        if certificate:
            context.load_cert_chain(certificate, named.get("privateKey") or certificate)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS files of {address}: {e}") from None
    return context


def relay_service(
    reactor: IReactorTime, endpoint: str, factory: Factory
) -> ClientService:
    """
    A service that keeps a connection to the relay at the client endpoint
    string C{endpoint} (C{unix:path=/tmp/torq/market_data.sock},
    C{tcp:host=10.0.0.5:port=7001}, C{tls:host=relay:port=7001:trustRoots=DIR:
    certificate=FILE:privateKey=FILE}, or a bare socket path), reconnecting with
    exponential backoff and jitter whenever it is lost.
    """
    return ClientService(
        clientFromString(reactor, endpoint_string(endpoint)),
        factory,
        retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=5.0, jitter=random.random),
    )


class BlockingClient(Declaring):
    """
    A relay client for scripts, on a plain socket: connect to a Unix socket
    path or a C{unix:}, C{tcp:}, C{tls:} or C{ssl:} endpoint string
    (L{socket_address}, L{tls_context}), send frames, iterate over the frames
    received.
    """

    def __init__(self, address: str, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        family, where = socket_address(address)
        context = tls_context(address)
        if family == socket.AF_UNIX:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.socket.connect(where)
            except OSError:
                self.socket.close()
                raise
        else:
            host, port = cast("tuple[str, int]", where)
            self.socket = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
            if context is not None:
                try:
                    self.socket = context.wrap_socket(self.socket, server_hostname=host)
                except OSError:
                    self.socket.close()
                    raise
        self._framer = Framer(max_frame_size)
        self._tokens = count(1)
        self._ready: deque[tuple[Header, bytes]] = deque()
        self.incoming = Incoming()
        #: False once the relay closed the connection.
        self.connected = True

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close()

    @property
    def buffered(self) -> int:
        """Bytes received of a frame not yet complete."""
        return self._framer.buffered

    def publish(self, frame: bytes) -> None:
        """
        Send one or more whole frames, waiting as long as the relay holds
        publishers back.

        @raise RelayClosed: the relay closed the connection (why, if it said).
        """
        self._send(frame)

    def _send(self, data: bytes, timeout: float | None = None) -> None:
        """
        Write C{data}, within C{timeout} seconds if given.

        @raise RelayClosed: the relay closed the connection (why, if it said).
        @raise TimeoutError: the relay took none of it, or not all, in time.
        """
        self.socket.settimeout(timeout)
        try:
            self.socket.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
            self._drain(deadline=time.monotonic() + 1.0)
            raise RelayClosed(self.incoming.error) from None

    def _drain(self, deadline: float) -> None:
        """Read what the relay sent before it closed (its reason, with luck), until C{deadline}."""
        while self.connected and self._readBefore(deadline):
            pass

    def introduce(
        self,
        timeout: float = 2.0,
        *,
        publish_only: bool = False,
        sources: Iterable[int] | None = None,
        tlv_types: Iterable[int] | None = None,
    ) -> tuple[int, str]:
        """
        Declare what this connection receives and return the relay's
        C{(relay_domain, name)} from its answer. Frames that arrive before the
        answer stay for L{frames}.

        @raise TimeoutError: no answer within C{timeout} seconds.
        """
        answered = self.incoming.relay_infos
        self.declare(publish_only=publish_only, sources=sources, tlv_types=tlv_types)
        deadline = time.monotonic() + timeout
        while self.incoming.relay_infos == answered:
            if not self._readBefore(deadline):
                raise TimeoutError(f"no answer from the relay within {timeout}s")
        assert self.incoming.relay_info is not None
        return self.incoming.relay_info

    def account(self, timeout: float = 10.0) -> Account:
        """
        This connection's account, once the relay has taken (or refused)
        everything published before: its counts since the connection was
        made. Frames that arrive meanwhile stay for L{frames}.

        @raise TimeoutError: no answer within C{timeout} seconds.
        @raise RelayClosed: the relay closed the connection first.
        """
        deadline = time.monotonic() + timeout
        token = next(self._tokens)
        try:  # the relay may hold publishers back: the request too waits, as long as the answer may
            self._send(account_frame(token), timeout)
        except TimeoutError:
            raise TimeoutError(f"the relay took no account request within {timeout}s") from None
        while self.incoming.account is None or self.incoming.account.token != token:
            if not self._readBefore(deadline):
                if not self.connected:
                    raise RelayClosed(self.incoming.error)
                raise TimeoutError(f"no account from the relay within {timeout}s")
        return self.incoming.account

    def flush(self, timeout: float = 10.0) -> Account:
        """
        Like L{account}, the counts since the previous flush.

        @raise PublishRefused: the relay refused some of those frames.
        """
        return self._checkFlush(self.account(timeout))

    def next_heartbeat(self, timeout: float) -> dict[int, int]:
        """
        The last sequence per source the relay forwarded, from its next
        heartbeat: where a publisher resumes after the relay restarted (it
        starts from its audit log). While a running relay's audit log holds
        frames back (C{/health} says so), the frames it holds are not in
        it yet. On a connection that has published, heartbeats waiting
        unread may predate its last frames: resume from the first heartbeat
        of a new connection. Frames that arrive meanwhile stay for L{frames}.

        @raise TimeoutError: no heartbeat within C{timeout} seconds.
        """
        seen = self.incoming.heartbeats
        deadline = time.monotonic() + timeout
        while self.incoming.heartbeats == seen:
            if not self._readBefore(deadline):
                raise TimeoutError(f"no heartbeat from the relay within {timeout}s")
        return dict(self.incoming.last_sequences)

    def frames(self, timeout: float | None = None) -> Iterator[tuple[Header, bytes]]:
        """
        Yield C{(header, frame)} for each frame received, until the relay
        closes the connection or no frame arrives for C{timeout} seconds.
        Stopping early loses nothing: the frames not yet taken stay for the
        next call.

        @raise RelayDead: the relay went silent, heartbeats included.
        """
        while True:
            while self._ready:
                yield self._ready.popleft()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._ready:
                if not self._readBefore(deadline):
                    return

    def take(self, timeout: float | None) -> list[tuple[Header, bytes]]:
        """
        The frames received and not yet taken; if there are none, those of
        one read within C{timeout} seconds (C{None}: no limit), which may be
        none (after the timeout, or when the relay closed the connection:
        see L{connected}). For loops that must also wake on time.

        @raise RelayDead: the relay went silent, heartbeats included.
        """
        if not self._ready:
            self._read(timeout)
        taken = list(self._ready)
        self._ready.clear()
        return taken

    def receive(self, count: int, timeout: float) -> list[tuple[Header, bytes]]:
        """The next C{count} frames, or fewer if C{timeout} seconds pass first."""
        deadline = time.monotonic() + timeout
        received: list[tuple[Header, bytes]] = []
        while len(received) < count:
            if self._ready:
                received.append(self._ready.popleft())
                continue
            if not self._readBefore(deadline):
                break
        return received

    def _readBefore(self, deadline: float | None) -> bool:
        """
        Read once if C{deadline} (C{time.monotonic()}; C{None}: none) has
        not passed; C{False} if it has, or on timeout or close.
        """
        remaining = None if deadline is None else deadline - time.monotonic()
        return (remaining is None or remaining > 0) and self._read(remaining)

    def _read(self, timeout: float | None) -> bool:
        """
        Read once and frame what came; C{False} on timeout or close.

        @raise RelayDead: nothing came for three heartbeat intervals.
        """
        interval = self.incoming.heartbeat_interval
        silence = interval * MISSED_HEARTBEATS if interval else None
        watching = silence is not None and (timeout is None or timeout >= silence)
        self.socket.settimeout(silence if watching else timeout)
        try:
            data = self.socket.recv(256 * 1024)
        except TimeoutError:
            if watching:
                raise RelayDead(
                    f"nothing from the relay for {silence:g}s ({MISSED_HEARTBEATS} "
                    f"heartbeat intervals)"
                ) from None
            return False
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""  # closed all the same, with what it said before kept
        if not data:
            self.connected = False
            self.incoming.ended(self._framer)
            return False
        self._ready.extend(self.incoming.feed(self._framer, data))
        return True
