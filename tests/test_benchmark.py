"""
The benchmark harness itself works: a smoke run (tiny counts) of every kind
of case, with every frame verified. Speed is not checked here; see
docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys

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
    # 5 throughput cases (floor, ceiling, 3 domains), 3 with the execution
    # audit log off / fsync 10 ms / fsync always, and 4 latency cases (one
    # through two relays bridged by a NATS cluster)
    assert run.stdout.count("| yes |") == 12
    assert "FAILED" not in run.stdout
