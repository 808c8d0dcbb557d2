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
import time
import urllib.error
import urllib.request

import pytest
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.cli import CLEAR, describe
from twisted_relay.client import BlockingClient
from twisted_relay.domains import BUILTIN_DOMAINS
from twisted_relay.testing import frames_for, synthetic
from twisted_relay.validation import FramePolicy
from twisted_relay.wire import Domain, build_frame, unpack_header

from .relayprocess import RelayProcess

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
             "tlv_types": [40, 254], "size": len(frame)},
        )

    def test_syntheticFramesPassTheirRelaysChecks(self) -> None:
        """publish sends frames each shipped relay accepts, in sequence order."""
        for logic in BUILTIN_DOMAINS:
            policy = FramePolicy.for_logic(logic, verify_checksum=True)
            frames = list(synthetic(logic.domain, 10, None))
            for sequence, frame in enumerate(frames, 1):
                header = unpack_header(frame)
                self.assertEqual((header.relay_domain, header.sequence), (logic.domain, sequence))
                policy.check(frame, 0, len(frame))


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
    assert result.stderr == (
        "twisted-relay: 0 of the 3 frames asked for arrived within 0.5s of quiet\n"
    )


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
    "command, done", [(("publish", "--count", "100000000"), "sent"), (("tap", "--stats"), "received")]
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
    assert re.fullmatch(
        rf"twisted-relay: the relay at {path} closed the connection after [\d,]+ frames were "
        rf"{done}\n",
        stderr,
    ), stderr


def health_of(url: str) -> dict:
    """The relay's health document, whatever its HTTP status."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return json.load(e)


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
