"""
Benchmark peers, each its own process on the package's blocking client:

 - the publisher sends pre-built frames of one size, sequences 1..N, as fast
   as the socket takes them, or at a fixed rate with the send time
   (CLOCK_MONOTONIC, ns) stamped in each frame's timestamp field. With
   C{--direct} it connects to the subscribers themselves and writes every
   chunk to each of them: the C{direct} row, no relay in between;
 - the subscriber verifies everything it receives with vectorised checks
   (L{Verifier}): the CRC-32 of the whole stream (byte-identical to what was
   published), and that the frames are whole, of the expected size, and
   carry sequences 1..N in order. It measures when each byte arrived, and in
   latency mode the publish-to-receive latency of every frame. With
   C{--listen} it waits on its own socket for a C{--direct} publisher.

Both print one JSON line. The runner (L{benchmarks.run}) compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np

from twisted_relay.client import BlockingClient
from twisted_relay.domains import find_domain
from twisted_relay.wire import HEADER_SIZE, build_frame

#: A TLV type each domain accepts: Trade, SignalIdentity, OrderRequest.
TLV_FOR_DOMAIN = {1: 1, 2: 20, 3: 40}
SEND_SLICE = 256 * 1024
RECV_SIZE = 1024 * 1024
#: Bytes a subscriber gathers before it checks them, in throughput mode: the
#: checks of a small read cost nearly what those of a large one do, and on 2
#: cores what a subscriber spends is taken from what it measures. Only each
#: read's arrival time counts, so the batching changes no measurement.
BATCH = RECV_SIZE // 2


def build_stream(domain: int, size: int, count: int) -> np.ndarray:
    """C{count} valid frames of exactly C{size} bytes, as a (count, size) array."""
    room = size - HEADER_SIZE
    value = b"v" * (room - 2 if room - 2 <= 255 else room - 5)
    template = build_frame(domain, 1, 0, [(TLV_FOR_DOMAIN[domain], value)], timestamp=0)
    assert len(template) == size, (len(template), size)
    frames = np.frombuffer(template, np.uint8).reshape(1, size).repeat(count, axis=0)
    frames[:, 8:16].view("<u8")[:, 0] = np.arange(1, count + 1, dtype=np.uint64)
    seal(frames)
    return frames


def seal(frames: np.ndarray) -> None:
    """Recompute the CRC-32 of every frame in place (after changing fields)."""
    view = memoryview(frames).cast("B")
    size = frames.shape[1]
    crcs = frames[:, 28:32].view("<u4")[:, 0]
    for i in range(frames.shape[0]):
        start = i * size
        crcs[i] = zlib.crc32(view[start + 32 : start + size], zlib.crc32(view[start : start + 28]))


def ready_and_wait() -> None:
    """Tell the runner this peer is ready, and wait for its go."""
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()


def send_in_slices(send: Callable[[memoryview], None], data: memoryview) -> None:
    """Hand C{data} to C{send} in slices of L{SEND_SLICE} bytes."""
    for offset in range(0, len(data), SEND_SLICE):
        send(data[offset : offset + SEND_SLICE])


def published(count: int, size: int, crc: int, started: int) -> dict:
    """What a publisher reports: what it sent, and when it started and finished."""
    return {
        "frames": count,
        "bytes": count * size,
        "crc": crc,
        "started_ns": started,
        "finished_ns": time.monotonic_ns(),
    }


class Fanout:
    """
    The publisher's side of the C{direct} row: connected to every
    subscriber's own socket, it writes each chunk to all of them, to each as
    fast as it takes it.
    """

    def __init__(self, paths: list[str]) -> None:
        self.sockets = []
        for path in paths:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.setblocking(False)
            self.sockets.append(sock)

    def publish(self, data: bytes | memoryview) -> None:
        """Write all of C{data} to every subscriber."""
        data = memoryview(data)
        sent = dict.fromkeys(self.sockets, 0)
        while sent:
            _, writable, _ = select.select([], list(sent), [])
            for sock in writable:
                offset = sent[sock] + sock.send(data[sent[sock] :])
                if offset == len(data):
                    del sent[sock]
                else:
                    sent[sock] = offset

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def publish(args: argparse.Namespace) -> dict:
    frames = build_stream(args.domain, args.size, args.count)
    needs_crc = find_domain(str(args.domain_name)).verify_checksum
    relay = Fanout(args.path) if args.direct else BlockingClient(args.path[0])
    ready_and_wait()
    started = time.monotonic_ns()
    if args.rate:
        per_ms = max(1, args.rate // 1000)
        stamps = frames[:, 16:24].view("<u8")[:, 0]
        tick = time.monotonic()
        for first in range(0, args.count, per_ms):
            batch = frames[first : first + per_ms]
            stamps[first : first + per_ms] = time.monotonic_ns()
            if needs_crc:
                seal(batch)
            relay.publish(batch.tobytes())
            tick += 0.001
            delay = tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        crc = zlib.crc32(frames.tobytes())
    else:
        data = memoryview(frames).cast("B")
        send_in_slices(relay.publish, data)
        crc = zlib.crc32(data)
    result = published(args.count, args.size, crc, started)
    relay.close()
    return result


class Verifier:
    """
    The checks of one subscriber on the stream of frames it receives, fed
    chunk by chunk, cut anywhere: the CRC-32 of the whole stream, and for
    every frame that starts and ends inside a chunk, its size and its
    sequence, which its position in the stream gives (those cut by a chunk
    boundary are covered by the CRC of the whole stream). It is told when
    each read arrived (L{arrived}): the last one is the measurement.
    """

    def __init__(self, size: int, count: int, latency: bool = False) -> None:
        self.size = size
        self.expected = size * count
        self.received = self.crc = 0
        self.ok = True
        self.first_ns = self.last_ns = 0
        self.latencies: list[np.ndarray] | None = [] if latency else None

    @property
    def done(self) -> bool:
        return self.received >= self.expected

    def arrived(self, now_ns: int) -> None:
        """A read brought more of the stream at C{now_ns}."""
        self.last_ns = now_ns
        self.first_ns = self.first_ns or now_ns

    def feed(self, data: np.ndarray, now_ns: int) -> None:
        """
        Check the next C{data} of the stream (a flat uint8 array); C{now_ns}
        is when it arrived, for the latencies.
        """
        size, n = self.size, len(data)
        self.crc = zlib.crc32(data, self.crc)
        skip = -self.received % size
        whole = (n - skip) // size
        if whole > 0:
            frames = data[skip : skip + whole * size].reshape(whole, size)
            first = (self.received + skip) // size + 1
            sequences = frames[:, 8:16].view("<u8")[:, 0]
            self.ok &= bool(
                sequences[0] == first
                and (np.diff(sequences) == 1).all()
                and (frames[:, 24:28].view("<u4")[:, 0] == size - HEADER_SIZE).all()
            )
            if self.latencies is not None:
                self.latencies.append(now_ns - frames[:, 16:24].view("<u8")[:, 0].astype(np.int64))
        self.received += n

    def result(self) -> dict:
        """What the subscriber reports."""
        result = {
            "frames": self.received // self.size,
            "bytes": self.received,
            "crc": self.crc,
            "verified": self.ok and self.received == self.expected,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }
        if self.latencies:
            all_ns = np.concatenate(self.latencies)
            p50, p99, p999 = np.percentile(all_ns, [50, 99, 99.9])
            result["latency_us"] = {
                "p50": p50 / 1e3,
                "p99": p99 / 1e3,
                "p99.9": p999 / 1e3,
                "max": float(all_ns.max()) / 1e3,
            }
        return result


def accept_one(path: str, timeout: float) -> socket.socket:
    """Listen on C{path}, tell the runner, and take the one publisher that connects."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(timeout)
        print(json.dumps({"ready": True}), flush=True)
        return listener.accept()[0]
    finally:
        listener.close()
        os.unlink(path)


def subscribe(args: argparse.Namespace) -> dict:
    # The package's client connects (or the direct publisher is accepted);
    # the frames are then checked in bulk, straight from the socket, since a
    # per-frame loop would be slower than the relay under test.
    (path,) = args.path
    if args.listen:
        sock = accept_one(path, args.idle)
    else:
        sock = BlockingClient(path).socket
        print(json.dumps({"ready": True}), flush=True)
    sock.settimeout(args.idle)
    buffer = bytearray(RECV_SIZE)
    array, view = np.frombuffer(buffer, np.uint8), memoryview(buffer)
    verifier = Verifier(args.size, args.count, args.latency)
    # Latencies need each read's arrival time: each read is checked alone.
    batch = 1 if args.latency else BATCH
    filled = 0
    while verifier.received + filled < verifier.expected:
        try:
            n = sock.recv_into(view[filled:])
        except socket.timeout:
            break
        if not n:
            break
        now = time.monotonic_ns()
        verifier.arrived(now)
        filled += n
        if filled >= batch:
            verifier.feed(array[:filled], now)
            filled = 0
    if filled:
        verifier.feed(array[:filled], verifier.last_ns)
    return verifier.result()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    parser.add_argument("role", choices=["publish", "subscribe"])
    parser.add_argument(
        "path", nargs="+",
        help="the relay's socket; with --listen, this subscriber's own; with --direct, "
        "every subscriber's",
    )
    parser.add_argument("--domain-name", default="market")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=int, help="publish at this many frames/s")
    parser.add_argument("--latency", action="store_true", help="measure per-frame latency")
    parser.add_argument("--idle", type=float, default=20.0, help="give up after this silence")
    parser.add_argument("--direct", action="store_true",
                        help="publish: write to the subscribers' own sockets, no relay")
    parser.add_argument("--listen", action="store_true",
                        help="subscribe: wait for a --direct publisher on PATH")
    args = parser.parse_args(argv)
    if args.role == "subscribe" and len(args.path) != 1:
        parser.error("a subscriber takes one path")
    args.domain = find_domain(args.domain_name).domain
    result = publish(args) if args.role == "publish" else subscribe(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
