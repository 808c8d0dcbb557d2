"""Fixtures shared by the tests that run real relay processes."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from .helpers import free_ports
from .relayprocess import RelayProcess


@pytest.fixture
def http_relay():
    """
    Start a relay of a domain on a temporary Unix socket with --http on a free
    loopback port; returns C{(socket_path, status_url)}. Stopped afterwards.
    """
    started: list[tuple[RelayProcess, str]] = []

    def start(domain: str, *args: str) -> tuple[str, str]:
        workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
        (port,) = free_ports(1)
        path = os.path.join(workdir, "r.sock")
        relay = RelayProcess(
            workdir, "--domain", domain, "--listen", f"unix:{path}",
            "--http", f"tcp:{port}:interface=127.0.0.1", *args,
        )
        started.append((relay, workdir))
        relay.start().wait_listening(2)
        start.relay = relay  # type: ignore[attr-defined]  # the last one started
        return path, f"http://127.0.0.1:{port}"

    yield start
    for relay, workdir in started:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def workdir():
    """A fresh directory with a short path (Unix socket paths max out at 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
