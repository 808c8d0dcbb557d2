"""Frames and in-memory connections shared by the unit tests."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import urllib.error
import urllib.request
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import AuditLog

# The tests' helpers are the shipped ones, and these.
from twisted_relay.testing import (  # noqa: F401
    RecordingTransport,
    connect,
    frames_for,
    frames_in,
    free_ports,
    make_relay,
    orders,
    published,
)
from twisted_relay.wire import Domain


def audited_relay(testcase: SynchronousTestCase, rotate: int = 64 * 1024, **kw):
    """An execution relay on a fake clock with an audit log in a temporary directory."""
    relay = make_relay(Domain.EXECUTION, audit=AuditLog(temp_dir(testcase), rotate), **kw)
    relay.writeahead.start()
    testcase.addCleanup(relay.writeahead.stop)
    return relay



class DiskFull:
    """
    The audit log's file swapped for /dev/full (every write fails with
    ENOSPC) until L{free}: a real full disk, without filling one.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.kept = os.dup(audit._fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, audit._fd)
        os.close(full)

    def free(self) -> None:
        if self.kept >= 0:
            os.dup2(self.kept, self.audit._fd)
            os.close(self.kept)
            self.kept = -1


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut into chunks at the positions C{cuts} (taken modulo its length)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def temp_dir(testcase) -> str:
    """A fresh directory outside the checkout, removed after C{testcase}."""
    path = tempfile.mkdtemp(prefix="twisted-relay-test-")
    testcase.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path




@functools.cache
def native_loops() -> ModuleType:
    """
    twisted_relay/_cscan.c compiled on its own, with the compiler Python was
    built with (no setuptools: Python 3.12+ venvs lack it), and loaded: the
    tests compare it with the pure-Python loops even where the package under
    test runs from a checkout without the built module.
    """
    workdir = tempfile.mkdtemp(prefix="tr-cscan-")
    try:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        source = os.path.join(repo, "twisted_relay", "_cscan.c")
        built = os.path.join(workdir, "_cscan" + importlib.machinery.EXTENSION_SUFFIXES[0])
        compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
        include = sysconfig.get_paths()["include"]
        subprocess.run(
            [*compiler, "-shared", "-fPIC", "-O2", f"-I{include}", source, "-o", built],
            check=True,
        )
        spec = importlib.util.spec_from_file_location("_cscan", built)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def health_of(url: str) -> dict:
    """The health document of the relay whose --http is C{url}, whatever its HTTP status."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return json.load(e)
