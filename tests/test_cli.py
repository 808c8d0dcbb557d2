"""
Tests for the C{twisted-relay} command (L{twisted_relay.cli}): its output
formats, its synthetic frames, and the commands against a real relay.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay import cli
from twisted_relay.cli import CLEAR, describe
from twisted_relay.client import BlockingClient
from twisted_relay.domains import BUILTIN_DOMAINS
from twisted_relay.interfaces import IRelayLogic
from twisted_relay.testing import frames_for, synthetic
from twisted_relay.validation import FramePolicy
from twisted_relay.wire import Domain, build_frame, unpack_header

from .helpers import health_of
from .relayprocess import REPO, RelayProcess

COMMAND = os.path.join(os.path.dirname(sys.executable), "twisted-relay")


class FormatTests(SynchronousTestCase):
    def test_line(self) -> None:
        """A frame is one line: time, domain, source name, sequence, TLV names, size."""
        frame = build_frame(1, 2, 17, [(1, b"t" * 40)], timestamp=1_700_000_000_123_456_789)
        self.assertEqual(
            describe(unpack_header(frame), frame, False),
            "22:13:20.123456  market_data KRAKEN(2)                  seq 17         "
            "Trade(1)  74 B",
        )

    def test_json(self) -> None:
        """--json gives the fields as numbers."""
        frame = build_frame(3, 42, 5, [(40, b"o"), (255 - 1, b"v")], timestamp=9)
        self.assertEqual(
            json.loads(describe(unpack_header(frame), frame, True)),
            {"timestamp_ns": 9, "relay_domain": 3, "source": 42, "sequence": 5,
             "tlv_types": [40, 254], "size": len(frame), "frame": frame.hex()},
        )

    def test_syntheticFramesPassTheirRelaysChecks(self) -> None:
        """publish sends frames each shipped relay accepts, in sequence order."""
        for logic in BUILTIN_DOMAINS:
            policy = FramePolicy.for_logic(logic, verify_checksum=True)
            frames = list(synthetic(logic, 10))
            for sequence, frame in enumerate(frames, 1):
                header = unpack_header(frame)
                self.assertEqual((header.relay_domain, header.sequence), (logic.domain, sequence))
                policy.check(frame, 0, len(frame))


class Writes:
    """A relay connection that records each write, and is interrupted at the one given."""

    def __init__(self, interrupted_at: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.interrupted_at = interrupted_at

    def publish(self, data: bytes) -> None:
        if len(self.writes) == self.interrupted_at:
            raise KeyboardInterrupt()
        self.writes.append(data)


class DeliverTests(SynchronousTestCase):
    """publish's and replay --to's sending: each frame once, whatever stops it."""

    args = SimpleNamespace(rate=None, endpoint="/tmp/r.sock")

    def test_interruptedWriteNotSentAgain(self) -> None:
        """Ctrl-C in a write: nothing is written after it, and that write's frames are in doubt."""
        relay = Writes(interrupted_at=1)
        done = cli.deliver(relay, [b"f"] * 700, self.args, 256)
        self.assertEqual(relay.writes, [b"f" * 256])
        self.assertEqual((done.sent, done.in_doubt), (256, 256))
        self.assertIsInstance(done.stopped, KeyboardInterrupt)
        with self.assertRaises(KeyboardInterrupt):
            cli.finish(relay, self.args, done, "published")

    def test_refusedFrameStopsAfterTheOnesBefore(self) -> None:
        """A frame that may not be sent: those before it are sent, once, then the reason."""

        def frames():
            yield from [b"f"] * 300
            raise cli.Failed("frame 301 would be refused")

        relay = Writes()
        done = cli.deliver(relay, frames(), self.args, 256)
        self.assertEqual([len(w) for w in relay.writes], [256, 44])
        self.assertEqual((done.sent, done.in_doubt, str(done.stopped)), (300, 0, "frame 301 would be refused"))


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, timeout=timeout
    )


def test_publish_tap_status(http_relay):
    """Frames published by the command are tapped by the command, all of them; status counts them."""
    path, url = http_relay("market")
    tap = subprocess.Popen(
        [COMMAND, "tap", f"unix:{path}", "--json", "--count", "5000", "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(200):  # until the relay has the tap as a client
            if _status_clients(url):
                break
            time.sleep(0.05)
        published = run("publish", path, "--count", "5000")
        assert published.returncode == 0, published.stderr
        assert "published 5,000 market frames" in published.stdout
        out, err = tap.communicate(timeout=60)
    finally:
        tap.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["sequence"] for line in lines] == list(range(1, 5001))
    shown = run("status", url)
    assert shown.returncode == 0, shown.stderr
    assert "status     ok" in shown.stdout
    assert "frames     5,000 in" in shown.stdout


def _status_clients(url: str) -> bool:
    """Whether the relay at C{url} has a client connected (the tap)."""
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return bool(json.load(response)["clients"])


def test_errors_are_one_line():
    """No relay, no status endpoint, an unknown domain: one line and exit status 1."""
    for args, message in [
        (("tap", "/tmp/tr-no-such.sock"), "no relay at /tmp/tr-no-such.sock: the socket does not exist"),
        (("publish", "--domain", "forex"), "unknown domain 'forex'"),
        (("status", "http://127.0.0.1:9"), "cannot read http://127.0.0.1:9/health"),
    ]:
        result = run(*args)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("publish", "--source", "300"), "argument --source: '300' is not from 0 to 255"),
        (("tap", "--tlv-type", "300"), "argument --tlv-type: '300' is not from 0 to 255"),
        (("tap", "--source", "-1"), "argument --source: '-1' is not from 0 to 255"),
        (("publish", "--count", "-5"), "argument --count: '-5' is not above 0"),
        (("publish", "--rate", "fast"), "argument --rate: 'fast' is not a number"),
        (("tap", "--frobnicate"), "unrecognized arguments: --frobnicate"),
        (("status", "--count", "3"), "--count goes with --watch"),
        (("status", "--interval", "2"), "--interval goes with --watch"),
        (("status", "--json", "--watch"), "argument --watch: not allowed with argument --json"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    """A bad argument is one line naming it, with a hint, and exit status 2; no usage dump."""
    result = run(*args)
    assert result.returncode == 2
    # Arguments no command knows are the top command's to refuse.
    prog = "twisted-relay" if "unrecognized" in message else f"twisted-relay {args[0]}"
    assert result.stderr == f"{prog}: {message} (see {prog} --help)\n", result.stderr


def test_version():
    """--version prints the package's version."""
    import twisted_relay

    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"twisted-relay {twisted_relay.__version__}\n")


def test_status_of_something_else(http_relay):
    """status given the metrics URL reads the relay's health; given a non-relay, says so."""
    _, url = http_relay("market")
    shown = run("status", f"{url}/metrics")
    assert shown.returncode == 0 and "status     ok" in shown.stdout, shown.stderr
    shown = run("status", url.removeprefix("http://"))
    assert shown.returncode == 0 and "status     ok" in shown.stdout, shown.stderr


@pytest.mark.parametrize("args, logged", [((), False), (("--http-access-log",), True)])
def test_http_access_log(http_relay, args, logged):
    """Requests to --http are logged only with --http-access-log."""
    _, url = http_relay("market", *args)
    for _ in range(3):
        assert run("status", url).returncode == 0
    assert ('"GET /health HTTP/1.1" 200' in http_relay.relay.log()) is logged


def test_tap_count_not_reached(http_relay):
    """tap --count on a quiet relay exits 1 saying how many of the frames asked for came."""
    path, _ = http_relay("market")
    result = run("tap", path, "--count", "3", "--timeout", "0.5")
    assert result.returncode == 1
    summary, error = result.stderr.splitlines()
    assert summary.startswith("0 frames, 0 bytes in 0.5s")
    assert error == "twisted-relay: 0 of the 3 frames asked for arrived within 0.5s of quiet"


def test_relay_of_another_domain(http_relay):
    """publish and tap with the wrong --domain say which relay they reached."""
    path, _ = http_relay("market")
    for command in ("publish", "tap"):
        result = run(command, path, "--domain", "execution")
        assert result.returncode == 1
        assert result.stderr == (
            f"twisted-relay: the relay at {path} is the market relay (domain 1), "
            f"not execution: use --domain market\n"
        )


@pytest.mark.parametrize(
    "command, done",
    [
        (
            ("publish", "--count", "100000000"),
            r"the relay at \S+ closed the connection after [\d,]+ frames were sent",
        ),
        (("tap", "--stats"), r"lost the relay at \S+ after [\d,]+ frames: .*closed the connection"),
    ],
)
def test_relay_gone(command: tuple[str, ...], done: str):
    """A relay that dies while publish sends or tap listens: one line saying how far, exit 1."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "m.sock")
    relay = RelayProcess(workdir, "--domain", "market", "--listen", f"unix:{path}")
    relay.start().wait_listening()
    try:
        client = subprocess.Popen(
            [COMMAND, command[0], path, *command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while "is now a" not in relay.log():  # the client introduced itself
            assert time.monotonic() < deadline, relay.log()
            time.sleep(0.05)
        time.sleep(0.2)
        relay.process.kill()
        relay.wait_exit()
        _, stderr = client.communicate(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert client.returncode == 1
    assert re.search(rf"^twisted-relay: {done}\n\Z", stderr, re.M), stderr


NOBODY = 65534


def _as_nobody(*args: str) -> tuple[int, str]:
    """
    Run the command in a child process as uid and gid 65534 (forked: the
    interpreter may sit where that user cannot read); its status and stderr.
    """
    list(getPlugins(IRelayLogic))  # imported here: the child may not read the modules
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_end)
            sys.stdout, sys.stderr = open(os.devnull, "w"), os.fdopen(write_end, "w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = cli.main(list(args))
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as stderr:
        told = stderr.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), told


@pytest.mark.skipif(os.getuid() != 0, reason="publishing as another user needs root")
def test_refused_publish_names_the_reason(http_relay):
    """A publisher the execution relay does not allow fails with the relay's own reason."""
    path, _ = http_relay("execution", "--mode", "0666")
    os.chmod(os.path.dirname(path), 0o755)
    code, stderr = _as_nobody("publish", path, "--domain", "execution", "--count", "10")
    assert code == 1, stderr
    assert stderr.count("\n") == 1, stderr
    assert "closed the connection after 10 frames were sent" in stderr
    assert re.search(r"uid 65534 .*is not allowed to publish.*\(not_allowed_to_publish\)", stderr)


def test_refused_replay_names_the_reason(http_relay, tmp_path):
    """replay --to of an execution log into a market relay: every frame refused, exit 1."""
    execution, _ = http_relay("execution", "--audit-dir", str(tmp_path / "audit"))
    assert run("publish", execution, "--domain", "execution", "--count", "20").returncode == 0
    market, _ = http_relay("market")
    result = run("replay", str(tmp_path / "audit"), "--to", market, "--domain", "market")
    assert result.returncode == 1, result
    assert "republished 20 frames" in result.stdout and "accepted 0" in result.stdout
    assert result.stderr == (
        "twisted-relay: the relay refused 20 of the frames published (20 filtered); 0 accepted\n"
    )
    again = run("replay", str(tmp_path / "audit"), "--to", execution, "--domain", "execution")
    assert again.returncode == 0 and "the relay accepted all 20" in again.stdout


def test_bad_frames_fail_before_sending(http_relay):
    """A frame the relay would refuse fails locally with the relay's reason; nothing is sent."""
    path, url = http_relay("execution")
    for args, message in [
        (("--tlv", "99:00"), "frame 1 would be refused by the execution relay (unknown_tlv_type)"),
        (("--size", "33"), "no frame is 33 bytes"),
        (("--size", "2000000"), "(frame_too_large): payload_size 1999968 is over"),
        (("--size", "64", "--tlv", "40:00"), "--size and --tlv both say"),
    ]:
        result = run("publish", path, "--domain", "execution", *args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result
        assert message in result.stderr, result.stderr
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        assert json.load(response)["totals"]["frames_in"] == 0
    assert "connected" not in http_relay.relay.log()


def test_publish_sizes_and_tlvs(http_relay):
    """--size makes frames of that size, --tlv of those TLVs, on any domain: all accepted."""
    path, _ = http_relay("market")
    tap = subprocess.Popen(
        [COMMAND, "tap", path, "--json", "--count", "6", "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for_tap(http_relay)
        sized = run("publish", path, "--size", "5000", "--count", "3")
        assert sized.returncode == 0 and "the relay accepted all 3" in sized.stdout, sized
        tlvs = run("publish", path, "--tlv", "1:aabb", "--tlv", "2:" + "cc" * 300, "--count", "3")
        assert tlvs.returncode == 0, tlvs
        out, _ = tap.communicate(timeout=60)
    finally:
        tap.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["size"] for line in lines[:3]] == [5000] * 3
    assert [line["tlv_types"] for line in lines[3:]] == [[1, 2]] * 3
    assert bytes.fromhex(lines[3]["frame"])[32:] == bytes.fromhex("0102aabb" + "ff0002" + "2c01" + "cc" * 300)


def _wait_for_tap(http_relay, clients: int = 1) -> None:
    """Until the last relay started has C{clients} clients (the taps) connected."""
    for _ in range(200):
        if http_relay.relay.log().count("connected (") >= clients:
            return
        time.sleep(0.05)
    raise AssertionError("the tap did not connect")


class Lines:
    """A command's standard output read line by line as it comes, each line with its time."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # Ctrl-C as a terminal gives it, whatever the tests inherited.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float = 20) -> float:
        """When a line matching C{pattern} came (waiting for it at most C{timeout} seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if re.search(pattern, line):
                    return when
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in {self.lines}")

    def finish(self, timeout: float = 30) -> tuple[int, list[str], str]:
        """The exit status, the lines and standard error, once the command ended."""
        stderr = self.process.stderr.read()
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code, [line for _, line in self.lines], stderr


def test_tap_stats_shows_a_burst(http_relay):
    """
    tap --stats redraws each second by itself: a burst of 100,000 frames
    shows within 2 s of its end at the right total, the rate falls to 0
    after it, and the summary ends the run.
    """
    path, _ = http_relay("market")
    tap = Lines("tap", path, "--stats", "--timeout", "3")
    try:
        _wait_for_tap(http_relay)
        published = run("publish", path, "--count", "100000")
        done = time.monotonic()
        assert published.returncode == 0, published.stderr
        assert tap.wait_for(r"\| 100,000 frames \|") - done < 2.0
        tap.wait_for(r"^ +0 frames/s .*\| 100,000 frames \|")
        code, lines, stderr = tap.finish()
    finally:
        tap.process.kill()
    assert code == 0, stderr
    rates = [int(line.split()[0].replace(",", "")) for line in lines[:-1]]
    assert max(rates) > 10_000, lines
    assert re.match(
        r"100,000 frames, 8,000,000 bytes in [\d.]+s \([\d,]+ frames/s\); the relay dropped 0 "
        r"to this tap; gaps upstream 0$",
        lines[-1],
    ), lines


def test_slow_tap_counts_drops_to_itself(http_relay):
    """A tap too slow for the relay reports what the relay dropped to it, not gaps upstream."""
    path, url = http_relay("market")
    tap = Lines("tap", path, "--stats", "--timeout", "3")
    try:
        _wait_for_tap(http_relay)
        tap.process.send_signal(signal.SIGSTOP)
        try:
            published = run("publish", path, "--count", "200000")
        finally:
            tap.process.send_signal(signal.SIGCONT)
        assert published.returncode == 0, published.stderr
        code, lines, stderr = tap.finish()
    finally:
        tap.process.kill()
    assert code == 0, stderr
    summary = re.match(
        r"([\d,]+) frames, .*; the relay dropped ([\d,]+) to this tap; gaps upstream 0$", lines[-1]
    )
    assert summary, lines
    received, dropped = (int(n.replace(",", "")) for n in summary.groups())
    assert dropped > 0 and received + dropped == 200_000, lines


def test_tap_recover_splices(http_relay):
    """tap --recover starts from the audit log and goes on live, without gap or duplicate."""
    path, _ = http_relay("execution")
    orders = frames_for(Domain.EXECUTION, 70, source=42)
    with BlockingClient(path) as publisher:
        publisher.publish(b"".join(orders[:50]))
        publisher.flush()
        tap = Lines(
            "tap", path, "--domain", "execution", "--json", "--recover", "42:11", "--count", "60",
            "--timeout", "20",
        )
        try:
            _wait_for_tap(http_relay, clients=2)
            for start in range(50, 70, 5):
                publisher.publish(b"".join(orders[start : start + 5]))
                time.sleep(0.02)
            code, lines, stderr = tap.finish()
        finally:
            tap.process.kill()
    assert code == 0, stderr
    tapped = [json.loads(line) for line in lines]
    assert [line["sequence"] for line in tapped] == list(range(11, 71))
    assert [bytes.fromhex(line["frame"]) for line in tapped] == orders[10:]


def test_tap_recover_refused(http_relay):
    """--recover on a relay without an audit log is one line saying why."""
    path, _ = http_relay("market")
    result = run("tap", path, "--recover", "1:5", "--count", "1")
    assert result.returncode == 1
    assert result.stderr.endswith(
        "cannot replay source 1 from sequence 5: it keeps no audit log (the execution relay "
        "does, or --audit-dir)\n"
    ), result.stderr


def test_tap_follow_survives_a_restart():
    """tap --follow reconnects to a restarted relay and resumes from its log: every frame, once."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "e.sock")
    args = ("--domain", "execution", "--listen", path, "--audit-dir", os.path.join(workdir, "audit"))
    relay = RelayProcess(workdir, *args).start().wait_listening()
    orders = frames_for(Domain.EXECUTION, 30, source=42)
    tap = Lines("tap", path, "--domain", "execution", "--json", "--follow", "--count", "30",
                "--timeout", "30")
    try:
        deadline = time.monotonic() + 20
        while "is now a subscriber" not in relay.log():
            assert time.monotonic() < deadline, relay.log()
            time.sleep(0.05)
        with BlockingClient(path) as publisher:
            publisher.publish(b"".join(orders[:10]))
            publisher.flush()
        tap.wait_for(r'"sequence": 10,')
        relay.stop()
        relay = RelayProcess(workdir, *args).start().wait_listening()
        with BlockingClient(path) as publisher:  # the tap is away, or just back
            publisher.publish(b"".join(orders[10:20]))
            publisher.flush()
            deadline = time.monotonic() + 20
            while relay.log().count("is now a subscriber") < 1:
                assert time.monotonic() < deadline, relay.log()
                time.sleep(0.05)
            publisher.publish(b"".join(orders[20:]))
            publisher.flush()
        code, lines, stderr = tap.finish()
    finally:
        tap.process.kill()
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0, stderr
    assert [bytes.fromhex(json.loads(line)["frame"]) for line in lines] == orders
    assert "reconnecting" in stderr and "reconnected" in stderr, stderr


@pytest.mark.parametrize("form", ["json", "hex", "raw", "stdin"])
def test_publish_from_round_trips(http_relay, tmp_path, form):
    """What tap --json printed, published again with --from (as JSON, hex, raw or stdin), is tapped byte for byte."""
    path, _ = http_relay("signal")
    first = Lines("tap", path, "--domain", "signal", "--json", "--count", "50", "--timeout", "20")
    _wait_for_tap(http_relay)
    assert run("publish", path, "--domain", "signal", "--count", "50", "--size", "300").returncode == 0
    code, printed, stderr = first.finish()
    assert code == 0, stderr
    frames = [bytes.fromhex(json.loads(line)["frame"]) for line in printed]
    source = tmp_path / "frames"
    if form == "json":
        source.write_text("".join(line + "\n" for line in printed))
    elif form == "hex":
        source.write_text("# frames in hex\n" + "".join(f.hex() + "\n\n" for f in frames))
    else:
        source.write_bytes(b"".join(frames))
    second = Lines("tap", path, "--domain", "signal", "--json", "--count", "50", "--timeout", "20")
    _wait_for_tap(http_relay, clients=3)
    if form == "stdin":
        published = subprocess.run(
            [COMMAND, "publish", path, "--domain", "signal", "--from", "-"],
            input=source.read_bytes(), capture_output=True, timeout=60,
        )
    else:
        published = subprocess.run(
            [COMMAND, "publish", path, "--domain", "signal", "--from", str(source)],
            capture_output=True, timeout=60,
        )
    assert published.returncode == 0, published.stderr
    assert b"published 50 signal frames" in published.stdout
    code, again, stderr = second.finish()
    assert code == 0, stderr
    assert [bytes.fromhex(json.loads(line)["frame"]) for line in again] == frames


def test_publish_from_bad_input(http_relay, tmp_path):
    """A file that is not frames fails with the line or byte and why, before sending."""
    path, _ = http_relay("market")
    lines = tmp_path / "lines"
    lines.write_text("deadbeef\n")
    torn = tmp_path / "torn"
    torn.write_bytes(frames_for(Domain.MARKET_DATA, 2)[1] + frames_for(Domain.MARKET_DATA, 1)[0][:40])
    signal_frame = tmp_path / "signal"
    signal_frame.write_text(frames_for(Domain.SIGNAL, 1)[0].hex() + "\n")
    for source, message in [
        (lines, "frame 1 would be refused by the market relay (incomplete_frame)"),
        (torn, "ends in the middle of a frame (40 bytes of it)"),
        (signal_frame, "frame 1 would be refused by the market relay (filtered)"),
    ]:
        result = run("publish", path, "--from", str(source))
        assert result.returncode == 1 and message in result.stderr, result


def test_tap_hex(http_relay):
    """tap --hex prints each frame's payload after its line."""
    path, _ = http_relay("market")
    tap = Lines("tap", path, "--hex", "--count", "1", "--timeout", "20")
    _wait_for_tap(http_relay)
    assert run("publish", path, "--tlv", "1:c0ffee", "--count", "1").returncode == 0
    code, lines, _ = tap.finish()
    assert code == 0 and lines[0].endswith("Trade(1)  37 B  0103c0ffee"), lines


def wait_for(url: str, check, timeout: float = 10.0) -> dict:
    """The first health document of C{url} that passes C{check}, polled for C{timeout}s."""
    deadline = time.monotonic() + timeout
    while not check(health := health_of(url)):
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_status_exit_status(http_relay):
    """status and status --json exit 0 when ok, 1 with one line when degraded and when stopping."""
    path, url = http_relay("market", "--high-water", "65536", "--drain-timeout", "5")
    shown = run("status", url, "--json")
    assert (shown.returncode, shown.stderr) == (0, "")
    assert json.loads(shown.stdout)["status"] == "ok"
    with BlockingClient(path), BlockingClient(path) as publisher:
        wait_for(url, lambda health: len(health["clients"]) == 2)
        publisher.publish(b"".join(frames_for(Domain.MARKET_DATA, 20_000)))
        wait_for(url, lambda health: health["status"] == "degraded")
        shown = run("status", url)
        assert shown.returncode == 1
        assert "status     degraded\nreasons    frames dropped for client 1, " in shown.stdout
        assert re.fullmatch(
            rf"twisted-relay: the relay at {url}/health is degraded: frames dropped for client 1, "
            r"\d+s ago \(degraded for 60s after each\)\n",
            shown.stderr,
        ), shown.stderr
        shown = run("status", url, "--json")
        assert shown.returncode == 1 and shown.stderr.count("\n") == 1
        assert json.loads(shown.stdout)["reasons"][0].startswith("frames dropped for client 1, ")
        http_relay.relay.process.send_signal(signal.SIGTERM)
        wait_for(url, lambda health: health["status"] == "stopping")
        shown = run("status", url)
        assert shown.returncode == 1 and "status     stopping" in shown.stdout
        assert shown.stderr.startswith(f"twisted-relay: the relay at {url}/health is stopping: ")


def watch_views(output: str) -> list[list[str]]:
    """The views of a status --watch output without a terminal (each begins with the time)."""
    return [view.splitlines() for view in re.split(r"\n\n(?=\d\d:\d\d:\d\d  )", output)]


def test_status_watch_lines(http_relay):
    """--watch without a terminal: plain lines, one view a refresh, rates from the second on."""
    path, url = http_relay("market")
    with BlockingClient(path) as subscriber:
        wait_for(url, lambda health: len(health["clients"]) == 1)
        publisher = subprocess.Popen(
            [COMMAND, "publish", path, "--rate", "2000", "--count", "100000"],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for(url, lambda health: health["totals"]["frames_in"] > 0)
            shown = run("status", url, "--watch", "--count", "3", "--interval", "0.5")
        finally:
            publisher.kill()
            publisher.wait()
        subscriber.close()
    assert (shown.returncode, shown.stderr) == (0, "")
    assert "\x1b" not in shown.stdout
    views = watch_views(shown.stdout)
    assert len(views) == 3, shown.stdout
    for view in views:
        assert re.fullmatch(r"\d\d:\d\d:\d\d  market relay \(domain 1\)  OK  up .*", view[0])
        assert view[1].startswith("relay     2 clients")
    assert "frames/s" not in views[0][1]  # no rates without an earlier sample
    rates = re.search(r"  in ([\d,]+) frames/s", views[2][1])
    assert rates and int(rates[1].replace(",", "")) > 0, views[2]
    [publisher_row] = [line for line in views[2] if " publisher " in line]
    assert int(publisher_row.split()[3].replace(",", "")) > 0, publisher_row


def test_status_watch_terminal(http_relay):
    """--watch on a terminal clears it before each view and keeps to its width and height."""
    _, url = http_relay("market")
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 5, 50, 0, 0))
    watcher = subprocess.Popen(
        [COMMAND, "status", url, "--watch", "--count", "2", "--interval", "0.2"],
        stdout=terminal, stderr=subprocess.PIPE,
        # The terminal's own size, not one a shell may have exported.
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([main], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal's other end is closed: the watcher is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert watcher.wait(timeout=10) == 0, watcher.stderr.read()
    text = output.decode()
    assert text.count(CLEAR) == 2, text
    for view in text.split(CLEAR)[1:]:
        lines = view.replace("\r\n", "\n").rstrip("\n").split("\n")
        assert len(lines) <= 4 and max(map(len, lines)) <= 50, lines
        assert lines[-1].startswith("... ") and lines[-1].endswith(" more rows"), lines


def test_status_watch_interrupted(http_relay):
    """Ctrl-C ends --watch cleanly: exit status 0, nothing on stderr."""
    _, url = http_relay("market")
    watcher = subprocess.Popen(
        [COMMAND, "status", url, "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert select.select([watcher.stdout], [], [], 20)[0], "no view within 20s"
        assert " market relay " in watcher.stdout.readline()
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=10)
    finally:
        watcher.kill()
    assert (watcher.returncode, stderr) == (0, "")


def test_status_watch_unreachable():
    """--watch goes on through an unreachable relay, a line each refresh; a bounded run then exits 1."""
    shown = run("status", "http://127.0.0.1:9", "--watch", "--count", "2", "--interval", "0.1")
    assert shown.returncode == 1
    lines = shown.stdout.split("\n\n")
    assert len(lines) == 2
    assert all(" cannot read http://127.0.0.1:9/health: " in line for line in lines)
    assert shown.stderr.startswith("twisted-relay: cannot read http://127.0.0.1:9/health: ")
    assert shown.stderr.count("\n") == 1


def test_replay_follow(http_relay, tmp_path):
    """replay --follow prints each frame as the relay logs it, across the log's files, until Ctrl-C."""
    audit = tmp_path / "audit"
    path, _ = http_relay("execution", "--audit-dir", str(audit), "--audit-rotate", "65536")
    follow = Lines("replay", str(audit), "--follow", "--json")
    orders = frames_for(Domain.EXECUTION, 3000, source=42)
    try:
        with BlockingClient(path) as publisher:
            for start in range(0, 3000, 500):
                publisher.publish(b"".join(orders[start : start + 500]))
                publisher.flush()
                follow.wait_for(rf'"sequence": {start + 500},')
        follow.process.send_signal(signal.SIGINT)
        code, lines, stderr = follow.finish()
    finally:
        follow.process.kill()
    assert code == 130, stderr
    assert len(os.listdir(audit)) > 2
    assert [bytes.fromhex(json.loads(line)["frame"]) for line in lines] == orders


def test_tap_summary_on_ctrl_c(http_relay):
    """Ctrl-C ends tap with its summary (exit status 130), whatever it was printing."""
    path, _ = http_relay("market")
    for args in (("--stats",), ("--json",)):
        tap = Lines("tap", path, *args)
        try:
            _wait_for_tap(http_relay, clients=1 if args == ("--stats",) else 3)
            assert run("publish", path, "--count", "10").returncode == 0
            if args == ("--stats",):
                tap.wait_for(r"\| 10 frames \|")
            else:
                tap.wait_for(r'"sequence": 10,')
            tap.process.send_signal(signal.SIGINT)
            code, lines, stderr = tap.finish()
        finally:
            tap.process.kill()
        assert code == 130, stderr
        summary = lines[-1] if args == ("--stats",) else stderr.splitlines()[-1]
        assert summary.startswith("10 frames, "), (lines, stderr)


def test_publish_plugin_domain(tmp_path):
    """publish builds frames for a domain added by a plugin, which its relay accepts."""
    plugins = tmp_path / "site" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "acme_relay_domain.py").write_text("from tests.plugins.acme_domain import acme\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), REPO])}
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "acme.sock")
    relay = RelayProcess(workdir, "--domain", "acme", "--listen", path, env=env)
    relay.start().wait_listening()
    try:
        published = subprocess.run(
            [COMMAND, "publish", path, "--domain", "acme", "--count", "50", "--size", "100"],
            capture_output=True, text=True, timeout=60, env={**os.environ, **env},
        )
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert published.returncode == 0, published.stderr
    assert "published 50 acme frames (5,000 bytes)" in published.stdout
    assert "the relay accepted all 50" in published.stdout
