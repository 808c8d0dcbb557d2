"""
What other clients cost a healthy publisher-subscriber pair on the market
relay (drop policy): the pair's verified rate beside a crowd, as a ratio to
its rate alone, measured in alternation so that both see the same machine.

 - C{1 TLV filter}, C{20 TLV filters}: subscribers with a TLV-type
   subscription each (distinct ones), reading all they get; their filters
   match none of the pair's frames, so what they cost is the pick alone;
 - C{2000 stuck}: subscribers that never read. They are filled to their
   high-water mark by a warm-up stream before the pair starts, so the run
   measures a relay whose stuck clients are over their mark, not the
   filling.

    python -m benchmarks.isolation              # every crowd, 3 runs each
    python -m benchmarks.isolation --only stuck --repeat 1

The targets (issue 15): one filter costs the pair at most 10% of its rate,
20 filters at most half, 2000 stuck subscribers leave it at least 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from benchmarks.run import TIMEOUT, Case, peer_command, start_peer, start_relay
from twisted_relay.control import control_frame
from twisted_relay.wire import build_frame

#: Frames of the pair per run (64 bytes each).
COUNT = 2_000_000
SIZE = 64
#: The relay's high-water mark, above what the pair publishes (128 MB): on 2
#: cores its subscriber lags behind a publisher at full speed, and must not
#: lose a frame.
HIGH_WATER = 256 * 1024 * 1024


@dataclass(frozen=True)
class Crowd:
    name: str
    target: float
    filters: int = 0
    stuck: int = 0


CROWDS = (
    Crowd("1 TLV filter", 0.90, filters=1),
    Crowd("20 TLV filters", 0.50, filters=20),
    Crowd("2000 stuck", 0.25, stuck=2000),
)


class Clients:
    """
    The crowd's connections, all in this process: the filtered ones are
    read (and what they get thrown away) by a thread; the stuck ones never.
    """

    def __init__(self, path: str, crowd: Crowd) -> None:
        self.sockets: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        for n in range(crowd.filters + crowd.stuck):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            self.sockets.append(sock)
            if n < crowd.filters:
                # TLV types 100 + n: none is in the pair's frames (type 1).
                sock.sendall(control_frame(tlv_types=[100 + n]))
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                try:
                    key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)
        for sock in self.sockets:
            sock.close()


def read_json(process: subprocess.Popen, timeout: float = TIMEOUT) -> dict:
    """A peer's next JSON line, by poll: the crowd's sockets take the low descriptors."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        if not selector.select(timeout):
            raise RuntimeError(f"{process.args[2:4]} gave no answer within {timeout}s")
    line = process.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"{process.args[2:4]} exited with {process.wait()}")
    return json.loads(line)


def warm_up(path: str, megabytes: int) -> None:
    """Publish C{megabytes} of frames from a source the pair does not use."""
    frame = build_frame(1, 2, 1, [(1, b"w" * 28)])
    chunk = frame * 1024
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    for _ in range(megabytes * 1024 * 1024 // len(chunk)):
        sock.sendall(chunk)
    sock.close()


def relay_command(path: str) -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [
        twistd, "-n", "--pidfile=", "relay", "--domain", "market", "--listen", f"unix:{path}",
        "--high-water", str(HIGH_WATER), "--stats-interval", "0", "--heartbeat", "0",
    ]


def run(crowd: Crowd | None, workdir: str) -> dict:
    """One run of the pair, beside C{crowd} (or alone): its verified rate."""
    path = os.path.join(workdir, "relay.sock")
    relay = start_relay(relay_command(path), path, workdir, "relay")
    clients = None
    processes = [relay]
    try:
        if crowd is not None:
            clients = Clients(path, crowd)
            if crowd.stuck:
                warm_up(path, HIGH_WATER // (1024 * 1024) + 16)
        case = Case("relay", "market", SIZE, 1, COUNT)
        subscriber = start_peer(peer_command("benchmarks.peers", case, "subscribe", path))
        processes.append(subscriber)
        read_json(subscriber)
        publisher = start_peer(peer_command("benchmarks.peers", case, "publish", path))
        processes.append(publisher)
        read_json(publisher)
        time.sleep(0.2)
        publisher.stdin.write(b"go\n")
        publisher.stdin.flush()
        published = read_json(publisher)
        received = read_json(subscriber, TIMEOUT)
        alive = relay.poll() is None
    finally:
        if clients is not None:
            clients.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        os.unlink(os.path.join(workdir, "relay.log"))
    verified = (
        alive and received["verified"] and received["frames"] == COUNT
        and received["crc"] == published["crc"]
    )
    seconds = (received["last_ns"] - published["started_ns"]) / 1e9
    return {"verified": verified, "msg_per_s": COUNT / seconds}


def measure(crowd: Crowd, repeat: int, workdir: str) -> dict:
    """The pair alone and beside C{crowd}, C{repeat} times each, alternating."""
    alone, beside = [], []
    for _ in range(repeat):
        for runs, who in ((alone, None), (beside, crowd)):
            result = run(who, workdir)
            if not result["verified"]:
                raise SystemExit(f"{crowd.name}: the pair lost or damaged frames")
            runs.append(result["msg_per_s"])
    ratios = [b / a for a, b in zip(alone, beside)]
    return {
        "alone": statistics.median(alone),
        "beside": statistics.median(beside),
        "ratio": statistics.median(ratios),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolation")
    parser.add_argument("--only", action="append", default=[],
                        help="crowds whose name contains this; repeatable")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the relay inherits it
    crowds = [c for c in CROWDS if not args.only or any(o in c.name for o in args.only)]
    workdir = tempfile.mkdtemp(prefix="isolation-", dir="/tmp")
    rows = []
    try:
        for crowd in crowds:
            print(f"running {crowd.name} ({args.repeat} x 2 runs)", file=sys.stderr, flush=True)
            rows.append((crowd, measure(crowd, args.repeat, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| beside the pair | pair alone msg/s | pair beside msg/s | ratio | target | met |")
    print("|---|---:|---:|---:|---:|---|")
    met = True
    for crowd, result in rows:
        ok = result["ratio"] >= crowd.target
        met = met and ok
        print(
            f"| {crowd.name} | {result['alone']:,.0f} | {result['beside']:,.0f} | "
            f"{result['ratio']:.2f} | >= {crowd.target:.2f} | {'yes' if ok else 'NO'} |"
        )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
