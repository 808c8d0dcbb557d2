"""
How the relay starts under twistd and twist, and how it fails to: one line
naming the reason on standard error and a non-zero exit, daemonized or not;
and no warning about the plugin cache for a user who cannot write it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from twisted.application.service import Service
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app.services import RelayServices
from twisted_relay.app.tap import Options
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
    lines = run.stderr.splitlines()
    if command[1:2] == ["--pidfile=twistd.pid"]:
        # twistd's launching process prints the first 98 bytes the daemon sent, then a hint.
        assert lines[0].startswith(f"An error has occurred: b'cannot listen on unix:{path}: "), lines
        assert lines[1:] == ["Please look at log file for more information."]
        with open(os.path.join(workdir, "twistd.log")) as f:
            assert reason in f.read()
        assert not os.path.exists(os.path.join(workdir, "twistd.pid"))
    else:
        assert lines == [f"twistd relay: cannot listen on unix:{path}: {reason}"], run


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
