"""
A long run of the market relay under mixed load, to see that it does not
grow: paced publishers, subscribers that keep up (every frame checked for
its sequence), slow readers, stuck ones replaced every minute, and churn
(clients that connect, subscribe or send garbage, and leave). The relay's
RSS and open descriptors are sampled every 5 seconds; after the warm-up
both must stay flat.

    python -m benchmarks.soak                 # 30 minutes
    python -m benchmarks.soak --minutes 3     # a short check

Exits 1 if the RSS grew by more than 32 MiB after the warm-up, the
descriptors did not come back, a checked subscriber missed a frame, or the
relay died.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time

from benchmarks.run import start_relay
from twisted_relay.control import control_frame
from twisted_relay.wire import HEADER_SIZE, build_frame, unpack_header

MiB = 1024 * 1024
#: Frames a second from each of the two publishers, 128 bytes each.
RATE = 20_000
WARM_UP = 120.0
#: The sources of the paced publishers, whose every frame is checked.
PUBLISHERS = (1, 2)
GROWTH = 32 * MiB


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


class Load:
    """The clients, each a thread, until C{stop} is set."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.received = 0
        self.threads: list[threading.Thread] = []

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        return sock

    def spawn(self, target, *args) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _guarded(self, target, *args) -> None:
        try:
            target(*args)
        except Exception as error:  # a client's failure is the soak's finding
            if not self.stop.is_set():
                self.errors.append(f"{target.__name__}: {error!r}")

    def publish(self, source: int) -> None:
        sock = self.connect()
        sock.sendall(control_frame(publish_only=True))
        sequence, started, batch = 0, time.monotonic(), RATE // 100
        while not self.stop.is_set():
            frames = [
                build_frame(1, source, sequence + n, [(1, b"p" * 92)]) for n in range(1, batch + 1)
            ]
            sequence += batch
            sock.sendall(b"".join(frames))
            ahead = sequence / RATE - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        sock.close()

    def check(self) -> None:
        """A subscriber that keeps up: every frame of every source, in sequence."""
        sock, buffer, last = self.connect(), bytearray(), {}
        sock.settimeout(5)
        while not self.stop.is_set():
            data = sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the relay closed a checked subscriber")
            buffer += data
            offset = 0
            while len(buffer) - offset >= HEADER_SIZE:
                header = unpack_header(buffer, offset)
                end = offset + HEADER_SIZE + header.payload_size
                if end > len(buffer):
                    break
                if header.source in PUBLISHERS:
                    previous = last.get(header.source)
                    if previous is not None and header.sequence != previous + 1:
                        raise RuntimeError(
                            f"source {header.source}: {header.sequence} after {previous}"
                        )
                    last[header.source] = header.sequence
                    self.received += 1
                offset = end
            del buffer[:offset]
        sock.close()

    def slow(self) -> None:
        """Reads 4 KiB a second: the relay drops for it, and it stays."""
        sock = self.connect()
        while not self.stop.is_set():
            sock.recv(4096)
            time.sleep(1)
        sock.close()

    def stuck(self) -> None:
        """Twenty clients that never read, replaced every minute."""
        while not self.stop.is_set():
            crowd = [self.connect() for _ in range(20)]
            self.stop.wait(60)
            for sock in crowd:
                sock.close()

    def churn(self) -> None:
        """A client every 50 ms that subscribes, declares, sends garbage or nothing, and leaves."""
        rng = random.Random(1)
        while not self.stop.is_set():
            sock = self.connect()
            kind = rng.randrange(4)
            if kind == 1:
                sock.sendall(control_frame(sources=[rng.randrange(3)]))
            elif kind == 2:
                sock.sendall(rng.randbytes(rng.randrange(1, 2000)))
            elif kind == 3:
                frame = build_frame(1, 9, 1, [(1, b"x")])
                sock.sendall(frame[: rng.randrange(1, len(frame) + 1)])  # whole or cut
            self.stop.wait(rng.random() * 0.1)
            sock.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--minutes", type=float, default=30.0)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    path = os.path.join(workdir, "relay.sock")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    relay = start_relay(
        [twistd, "-n", "--pidfile=", "relay", "--domain", "market", "--listen",
         f"unix:{path}", "--high-water", str(1 * MiB), "--stats-interval", "60"],
        path, workdir, "relay",
    )
    load = Load(path)
    for source in PUBLISHERS:
        load.spawn(load.publish, source)
    for _ in range(3):
        load.spawn(load.check)
    for _ in range(5):
        load.spawn(load.slow)
    load.spawn(load.stuck)
    load.spawn(load.churn)
    started = time.monotonic()
    samples: list[tuple[float, int, int]] = []
    try:
        while time.monotonic() - started < args.minutes * 60 and relay.poll() is None:
            time.sleep(5)
            elapsed = time.monotonic() - started
            rss = status(relay.pid, "VmRSS")
            fds = len(os.listdir(f"/proc/{relay.pid}/fd"))
            samples.append((elapsed, rss, fds))
            print(f"{elapsed:7.0f}s  rss {rss / MiB:7.1f} MiB  fds {fds:4d}  "
                  f"checked frames {load.received:,}", flush=True)
        alive = relay.poll() is None
    finally:
        load.stop.set()
        for thread in load.threads:
            thread.join(timeout=10)
        if relay.poll() is None:
            relay.terminate()
        relay.wait(timeout=30)
    settled = [s for s in samples if s[0] >= min(WARM_UP, args.minutes * 30)]
    first, peak = settled[0][1], max(s[1] for s in settled)
    fds_first, fds_last = settled[0][2], settled[-1][2]
    print(f"after the warm-up: rss {first / MiB:.1f} -> peak {peak / MiB:.1f} MiB, "
          f"last {settled[-1][1] / MiB:.1f} MiB; fds {fds_first} -> {fds_last}; "
          f"checked frames {load.received:,}; errors {load.errors or 'none'}")
    shutil.rmtree(workdir, ignore_errors=True)
    flat = peak - first <= GROWTH and abs(fds_last - fds_first) <= 25
    return 0 if alive and flat and not load.errors and load.received else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
