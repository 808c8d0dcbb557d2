"""
Benchmark peers, each its own process on the package's blocking client:

 - the publisher sends pre-built frames of one size, sequences 1..N, as fast
   as the socket takes them, or at a fixed rate with the send time
   (CLOCK_MONOTONIC, ns) stamped in each frame's timestamp field;
 - the subscriber verifies everything it receives with vectorised checks:
   the CRC-32 of the whole stream (byte-identical to what was published),
   and that the frames are whole, of the expected size, and carry sequences
   1..N in order. It measures when each byte arrived, and in latency mode
   the publish-to-receive latency of every frame.

Both print one JSON line. The runner (L{benchmarks.run}) compares them.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import zlib

import numpy as np

from twisted_relay.client import BlockingClient
from twisted_relay.domains import find_domain
from twisted_relay.wire import HEADER_SIZE, build_frame

#: A TLV type each domain accepts: Trade, SignalIdentity, OrderRequest.
TLV_FOR_DOMAIN = {1: 1, 2: 20, 3: 40}
SEND_SLICE = 256 * 1024
RECV_SIZE = 1024 * 1024


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


def publish(args: argparse.Namespace) -> dict:
    frames = build_stream(args.domain, args.size, args.count)
    needs_crc = find_domain(str(args.domain_name)).verify_checksum
    relay = BlockingClient(args.path)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
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
        for offset in range(0, len(data), SEND_SLICE):
            relay.publish(data[offset : offset + SEND_SLICE])
        crc = zlib.crc32(data)
    finished = time.monotonic_ns()
    relay.close()
    return {
        "frames": args.count,
        "bytes": args.count * args.size,
        "crc": crc,
        "started_ns": started,
        "finished_ns": finished,
    }


def subscribe(args: argparse.Namespace) -> dict:
    size, expected = args.size, args.count * args.size
    # The package's client connects; the frames are then checked in bulk,
    # straight from the socket, since a per-frame loop would be slower than
    # the relay under test.
    sock = BlockingClient(args.path).socket
    sock.settimeout(args.idle)
    print(json.dumps({"ready": True}), flush=True)
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    received, crc, ok = 0, 0, True
    latencies: list[np.ndarray] = []
    first_ns = last_ns = 0
    while received < expected:
        try:
            n = sock.recv_into(buffer)
        except socket.timeout:
            break
        if not n:
            break
        last_ns = time.monotonic_ns()
        first_ns = first_ns or last_ns
        crc = zlib.crc32(view[:n], crc)
        # The frames that start and end inside this read (those cut by a read
        # boundary are covered by the CRC of the whole stream): their stream
        # position gives the sequence they must carry.
        skip = -received % size
        whole = (n - skip) // size
        if whole > 0:
            frames = np.frombuffer(buffer, np.uint8, whole * size, skip).reshape(whole, size)
            first = (received + skip) // size + 1
            sequences = frames[:, 8:16].view("<u8")[:, 0]
            ok &= bool(
                sequences[0] == first
                and (np.diff(sequences) == 1).all()
                and (frames[:, 24:28].view("<u4")[:, 0] == size - HEADER_SIZE).all()
            )
            if args.latency:
                latencies.append(last_ns - frames[:, 16:24].view("<u8")[:, 0].astype(np.int64))
        received += n
    result = {
        "frames": received // size,
        "bytes": received,
        "crc": crc,
        "verified": ok and received == expected,
        "first_ns": first_ns,
        "last_ns": last_ns,
    }
    if latencies:
        all_ns = np.concatenate(latencies)
        p50, p99, p999 = np.percentile(all_ns, [50, 99, 99.9])
        result["latency_us"] = {
            "p50": p50 / 1e3,
            "p99": p99 / 1e3,
            "p99.9": p999 / 1e3,
            "max": float(all_ns.max()) / 1e3,
        }
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    parser.add_argument("role", choices=["publish", "subscribe"])
    parser.add_argument("path")
    parser.add_argument("--domain-name", default="market")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=int, help="publish at this many frames/s")
    parser.add_argument("--latency", action="store_true", help="measure per-frame latency")
    parser.add_argument("--idle", type=float, default=20.0, help="give up after this silence")
    args = parser.parse_args(argv)
    args.domain = find_domain(args.domain_name).domain
    result = publish(args) if args.role == "publish" else subscribe(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
