"""
The relay's inner loop: advancing over frames that need nothing but the scan.

On the market relay almost every frame is one of these: its header is
intact, it belongs to the relay's domain, and its sequence continues its
source's. L{scan_run} skips over a run of them and stops at the first frame
that needs a closer look (another domain, another source, a sequence jump, a
broken or incomplete header), which the caller then handles in Python.

A native version (C{_cscan}, built when a compiler is available) runs the
same loop about 20 times faster; this module's pure-Python version is used
otherwise, with the same results.
"""

from __future__ import annotations

from .wire import HEADER_SIZE, MAGIC, ROUTING, VERSION


def scan_run_python(
    buf: bytes, offset: int, end: int, max_payload: int, domain: int, source: int, last: int
) -> tuple[int, int, int]:
    """
    Advance from C{offset} over whole frames of C{buf[:end]} whose header is
    intact, whose relay_domain is C{domain}, whose source is C{source} and
    whose sequence follows C{last}. Returns C{(offset, frames, last)}: where
    it stopped, how many frames it passed, and the last sequence among them.
    """
    unpack = ROUTING.unpack_from
    last_start = end - HEADER_SIZE
    frames = 0
    while offset <= last_start:
        magic, frame_domain, version, frame_source, sequence, size = unpack(buf, offset)
        frame_end = offset + HEADER_SIZE + size
        if (
            magic != MAGIC
            or version != VERSION
            or size > max_payload
            or frame_end > end
            or frame_domain != domain
            or frame_source != source
            or sequence != last + 1
        ):
            break
        frames += 1
        last = sequence
        offset = frame_end
    return offset, frames, last


try:
    from ._cscan import scan_run  # type: ignore[import-not-found]
except ImportError:  # no compiler where this was installed
    scan_run = scan_run_python
    NATIVE = False
else:
    NATIVE = True
