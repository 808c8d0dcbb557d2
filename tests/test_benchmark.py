"""
The benchmark harness itself works: a smoke run (tiny counts) of every kind
of case, with every frame verified. Speed is not checked here; see
docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks.brokers import missing
from benchmarks.run import PEERS, matrix

from .relayprocess import REPO


def test_smoke_run_verifies_every_case():
    """Every smoke case runs to completion with every frame verified."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    verified = [line for line in rows if line.endswith("| yes |")]
    # Every case of the smoke matrix printed a verified row: one per throughput
    # case and per latency case, the brokers not installed here left out.
    expected = [c for c in matrix(smoke=True) if c.relay not in PEERS or not missing(c.relay)]
    assert len(verified) == len(expected), run.stdout + run.stderr
    assert "FAILED" not in run.stdout
    assert any(line.startswith("| relay (pure Python) | signal |") for line in verified)
