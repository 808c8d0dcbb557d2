"""
What the disk under the audit log allows: the latency of one append and
C{fdatasync} of a batch of records, as the audit log's writer makes them,
in a directory on the file system to measure. With C{--audit-fsync always}
no frame reaches a subscriber before such a sync returned, so its tail is a
floor under the execution relay's latency tail.

    python -m benchmarks.disk                    # /tmp, 2,000 syncs of 14,800 bytes
    python -m benchmarks.disk --dir /var/lib/torq --count 5000 --size 65536
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def measure(directory: str, count: int, size: int) -> dict[str, float]:
    """Append C{size} bytes and fdatasync, C{count} times; percentiles in µs."""
    fd, path = tempfile.mkstemp(prefix="disk-", dir=directory)
    data = b"r" * size
    took = np.empty(count)
    try:
        for i in range(count):
            start = time.perf_counter_ns()
            os.write(fd, data)
            os.fdatasync(fd)
            took[i] = time.perf_counter_ns() - start
    finally:
        os.close(fd)
        os.unlink(path)
    p50, p99, p999 = np.percentile(took, [50, 99, 99.9]) / 1e3
    return {"p50": p50, "p99": p99, "p99.9": p999, "max": took.max() / 1e3}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.disk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="a directory on the file system to measure")
    parser.add_argument("--count", type=int, default=2000, help="syncs to make")
    parser.add_argument("--size", type=int, default=14_800,
                        help="bytes per sync (default: 100 records of 128-byte frames)")
    args = parser.parse_args(argv)
    result = measure(args.dir, args.count, args.size)
    print(json.dumps({"dir": args.dir, "size": args.size, "count": args.count,
                      "latency_us": {k: round(v) for k, v in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
