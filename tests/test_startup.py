"""
How the relay starts under twistd and twist, and how it fails to: one line
naming the reason on standard error and a non-zero exit, daemonized or not;
and no warning about the plugin cache for a user who cannot write it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

import pytest
from twisted.application.service import Service
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app.services import RelayServices
from twisted_relay.app.tap import Options
from twisted_relay.audit import AuditDamage, AuditLog, audit_paths
from twisted_relay.testing import RelayProcess, script

from .relayprocess import REPO

#: Seconds any one wait of these tests may last.
WAIT = 10.0


class OptionErrorTests(SynchronousTestCase):
    def test_oneLineUnderARunner(self) -> None:
        """Run by twistd or twist, a bad option is one line naming it and where help is."""
        options = Options()
        options.parent = {}  # type: ignore[attr-defined]  # as twistd and twist set it
        error = self.assertRaises(SystemExit, options.parseOptions, ["--mode", "999"])
        self.assertRegex(
            str(error.code),
            r"^\S+ relay: --mode '999' is not an octal number \(see \S+ relay --help\)$",
        )

    def test_usageErrorOtherwise(self) -> None:
        """Parsed by a program of its own, Options raises UsageError as usage.Options do."""
        self.assertRaises(UsageError, Options().parseOptions, ["--mode", "999"])


class Refusing(Service):
    """A service whose start fails as the relay's do: SystemExit with the reason."""

    def startService(self) -> None:
        raise SystemExit("twistd relay: cannot listen on unix:/x: " + "no " * 40)


class FailedStartTests(SynchronousTestCase):
    def test_statusPipe(self) -> None:
        """Daemonized, the reason goes to twistd's status pipe, within its 100 bytes."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        pidfile = os.path.join(tempfile.mkdtemp(prefix="tr-", dir="/tmp"), "twistd.pid")
        self.addCleanup(shutil.rmtree, os.path.dirname(pidfile))
        with open(pidfile, "w") as f:
            f.write("1")
        services = RelayServices({"statusPipe": write, "pidfile": pidfile})
        Refusing().setServiceParent(services)
        error = self.assertRaises(SystemExit, services.startService)
        self.assertEqual(error.code, 1)
        message = os.read(read, 200)
        self.assertTrue(message.startswith(b"1 cannot listen on unix:/x: no no"), message)
        self.assertTrue(message.endswith(b"no ..."), message)
        self.assertEqual(len(message), 100)
        self.assertFalse(os.path.exists(pidfile))


# Real relay processes.


@pytest.mark.parametrize(
    "command",
    [["twistd", "-n", "--pidfile="], ["twistd", "--pidfile=twistd.pid"], ["twist"]],
    ids=["twistd -n", "twistd daemon", "twist"],
)
def test_failedStartExitsWithReason(workdir, command):
    """A relay already on the socket: the second start exits 1 with the reason on stderr."""
    path = os.path.join(workdir, "r.sock")
    first = RelayProcess(workdir, "--listen", f"unix:{path}").start().wait_listening()
    try:
        run = subprocess.run(
            [script(command[0]), *command[1:], "relay", "--listen", f"unix:{path}"],
            cwd=workdir, capture_output=True, text=True, timeout=WAIT,
        )
    finally:
        first.stop()
    assert run.returncode == 1, run
    reason = f"a relay is already listening on {path}"
    assert run.stderr.splitlines() == [f"twistd relay: cannot listen on unix:{path}: {reason}"], run
    assert not os.path.exists(os.path.join(workdir, "twistd.pid"))


# The failures a daemonized start is checked for. Each sets up what makes the
# start fail (undone by the stack) and returns the relay's arguments, the
# reason it must give, and a socket path the failed start must not leave.


def _liveRelay(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    path = os.path.join(workdir, "r.sock")
    first = RelayProcess(workdir, "--listen", f"unix:{path}").start().wait_listening()
    stack.callback(first.stop)
    return (
        ["--listen", f"unix:{path}"],
        f"cannot listen on unix:{path}: a relay is already listening on {path}",
        None,
    )


def _untrustedDirectory(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    shared = os.path.join(workdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    path = os.path.join(shared, "r.sock")
    return (
        ["--listen", f"unix:{path}"],
        f"cannot listen on unix:{path}: {shared} is writable by its group (mode 0777): they "
        f"could replace what the relay puts there (--no-strict-dirs overrides this, dangerously)",
        path,
    )


def _portInUse(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    blocker = stack.enter_context(socket.socket())
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    # An audit log checked (and opened) before the port: the check leaves no file in it.
    return (
        ["--domain", "execution", "--audit-dir", os.path.join(workdir, "audit"),
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        f"cannot listen on tcp:{port}:interface=127.0.0.1: Couldn't listen on "
        f"127.0.0.1:{port}: [Errno 98] Address already in use.",
        None,
    )


def _auditLocked(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    audit = os.path.join(workdir, "audit")
    first = RelayProcess(
        workdir, "--domain", "execution", "--audit-dir", audit,
        "--listen", f"unix:{workdir}/first.sock",
    ).start().wait_listening()
    stack.callback(first.stop)
    path = os.path.join(workdir, "r.sock")
    return (
        ["--domain", "execution", "--audit-dir", audit, "--listen", f"unix:{path}"],
        f"cannot use the audit directory {audit}: another relay writes to the audit "
        f"directory {audit}",
        path,
    )


def _auditDamaged(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    audit = os.path.join(workdir, "audit")
    log = AuditLog(audit)
    log.open()
    log.close()
    with open(audit_paths(audit)[0], "r+b") as f:
        f.seek(28)  # the header's count of (source, sequence) pairs
        f.write(b"\xff")
    damage = pytest.raises(AuditDamage, log.open).value
    log.close()
    path = os.path.join(workdir, "r.sock")
    return (
        ["--domain", "execution", "--audit-dir", audit, "--listen", f"unix:{path}"],
        f"the audit log is damaged ({damage}); run 'twisted-relay audit verify {audit}' "
        f"and move the damaged file away",
        path,
    )


def _auditNotADirectory(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    audit = os.path.join(workdir, "audit")
    with open(audit, "w"):
        pass
    path = os.path.join(workdir, "r.sock")
    return (
        ["--domain", "execution", "--audit-dir", audit, "--listen", f"unix:{path}"],
        f"cannot use the audit directory {audit}: it is not a directory",
        path,
    )


def _cannotBind(workdir: str, stack: ExitStack) -> tuple[list[str], str, str | None]:
    # 192.0.2.1 (TEST-NET-1) is no address of this host.
    return (
        ["--listen", "tcp:0:interface=192.0.2.1"],
        "cannot listen on tcp:0:interface=192.0.2.1: Couldn't listen on 192.0.2.1:0: "
        "[Errno 99] Cannot assign requested address.",
        None,
    )


def _twistd(workdir: str, args: list[str], *before: str) -> subprocess.CompletedProcess[str]:
    """twistd relay with C{args}, daemonized unless C{before} says -n, pid file and log in C{workdir}."""
    return subprocess.run(
        [script("twistd"), *before, "--pidfile=twistd.pid", "--logfile=twistd.log", "relay",
         "--stats-interval", "0", *args],
        cwd=workdir, capture_output=True, text=True, timeout=WAIT,
    )


@pytest.mark.parametrize(
    "failure",
    [_liveRelay, _untrustedDirectory, _portInUse, _auditLocked, _auditDamaged,
     _auditNotADirectory, _cannotBind],
    ids=["live relay", "untrusted directory", "port in use", "audit locked", "audit damaged",
         "audit not a directory", "cannot bind"],
)
def test_daemonizedFailureIsOneLine(workdir, failure):
    """Daemonized, a failed start is the line twistd -n gives, whole, before the fork: exit 1."""
    with ExitStack() as stack:
        args, reason, socket_path = failure(workdir, stack)
        daemonized = _twistd(workdir, args)
        assert (daemonized.returncode, daemonized.stdout) == (1, ""), daemonized
        assert daemonized.stderr == f"twistd relay: {reason}\n"
        assert not os.path.exists(os.path.join(workdir, "twistd.pid"))
        assert socket_path is None or not os.path.lexists(socket_path)
        if failure is _portInUse:
            assert audit_paths(os.path.join(workdir, "audit")) == []
        foreground = _twistd(workdir, args, "-n")
        assert (foreground.returncode, foreground.stderr) == (1, daemonized.stderr), foreground
    # The port in use is free once its blocker is closed: the failed starts hold none of it.
    for option, value in zip(args[::2], args[1::2]):
        if option == "--listen" and value.startswith("tcp:") and not value.startswith("tcp:0:"):
            with socket.socket() as free:
                free.bind(("127.0.0.1", int(value.split(":")[1])))


def test_daemonizedStart(workdir):
    """
    Daemonized, a start that passes the checks runs: the check's opening of
    the audit log left no lock, and its repair of a torn tail is logged.
    """
    audit, path = os.path.join(workdir, "audit"), os.path.join(workdir, "r.sock")
    log = AuditLog(audit)
    log.open()
    log.close()
    with open(audit_paths(audit)[0], "ab") as f:
        f.write(bytes(10))  # a record torn by a power loss
    run = _twistd(workdir, ["--domain", "execution", "--audit-dir", audit, "--listen", f"unix:{path}"])
    assert (run.returncode, run.stdout, run.stderr) == (0, "", ""), run
    with open(os.path.join(workdir, "twistd.pid")) as f:
        pid = int(f.read())
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT
        while os.path.exists(os.path.join(workdir, "twistd.pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not os.path.exists(os.path.join(workdir, "twistd.pid"))
    assert not os.path.lexists(path)
    with open(os.path.join(workdir, "twistd.log")) as f:
        logged = f.read()
    assert logged.count("cut off a torn last record") == 1, logged
    assert "audit log closed" in logged


@pytest.mark.parametrize(
    "runner, before", [("twistd", ["-n"]), ("twistd", []), ("twist", [])],
    ids=["twistd -n", "twistd", "twist"],
)
def test_optionErrorIsOneLine(workdir, runner, before):
    """A bad option: exit 1, one line on stderr, nothing on stdout."""
    run = subprocess.run(
        [script(runner), *before, "relay", "--domain", "nope"],
        cwd=workdir, capture_output=True, text=True, timeout=WAIT,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr == (
        f"{runner} relay: unknown domain 'nope'; available: execution, market, signal "
        f"(see {runner} relay --help)\n"
    )


def test_errorPriorityForTheJournal(workdir):
    """Standard error that is the journal (JOURNAL_STREAM) gets the line marked as an error."""
    with tempfile.TemporaryFile() as stderr:
        status = os.fstat(stderr.fileno())
        run = subprocess.run(
            [script("twistd"), "-n", "relay", "--domain", "nope"],
            cwd=workdir, stderr=stderr, timeout=WAIT,
            env={**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
        )
        stderr.seek(0)
        assert stderr.read().startswith(b"<3>twistd relay: unknown domain 'nope'")
    assert run.returncode == 1


def test_pluginCacheBuiltAtInstall(workdir):
    """
    A plugin directory the relay's user cannot write: a warning at every
    start (twice) until the command of docs/operations.md builds the cache,
    none after. A read-only copy of the plugin directory stands for the
    installed one and root without its capabilities for the relay's user
    (the tests' interpreter may live where another user cannot run it).
    """
    plugins = os.path.join(workdir, "site", "twisted", "plugins")
    os.makedirs(plugins)
    # Named apart: Twisted reads a plugin module only where it first finds its
    # name, and an installed copy of the relay's plugin (CI's) would come first.
    shutil.copy(
        os.path.join(REPO, "twisted", "plugins", "twisted_relay_plugin.py"),
        os.path.join(plugins, "relay_plugin_read_only.py"),
    )
    env = {"PYTHONPATH": os.path.join(workdir, "site")}
    # As root, drop the capabilities that let root write anywhere.
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.getuid() == 0 else []
    if unprivileged and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run without root's capabilities")

    def start_log() -> str:
        os.chmod(plugins, 0o555)
        try:
            relay = RelayProcess(workdir, "--listen", f"unix:{workdir}/r.sock", env=env)
            relay.args = [*unprivileged, *relay.args]
            relay.start().wait_listening()
            relay.stop()
            return relay.log()
        finally:
            os.chmod(plugins, 0o755)

    warning = f"Unable to write to plugin cache {plugins}/dropin.cache"
    assert start_log().count(warning) == 2
    subprocess.run(
        [sys.executable, "-c",
         "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"],
        cwd="/", env={**os.environ, **env}, check=True, timeout=WAIT,
    )
    assert os.path.exists(os.path.join(plugins, "dropin.cache"))
    assert warning not in start_log()
