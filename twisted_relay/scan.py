"""
The relay's inner loop: advancing over frames that need nothing but the scan.

On every relay almost every frame is one of these: its header is intact, it
belongs to the relay's domain, its sequence continues its source's, and it
passes the domain's checks (the CRC-32 and the strict TLV walk, where the
domain asks for them). L{scan_run} skips over a run of them and stops at the
first frame that needs a closer look (another domain, another source, a
sequence jump, a failed check, a broken or incomplete header), which the
caller then handles in Python, refusing and counting it if it must.

A native version (C{_cscan}, built when a compiler is available) runs the
same loop 20-50 times faster; this module's pure-Python version is the
reference, used otherwise (or when the environment sets
C{TWISTED_RELAY_PURE_PYTHON=1}), with the same results.
"""

from __future__ import annotations

import os
from types import ModuleType

from .wire import (
    CHECKSUM_OFFSET,
    HEADER_SIZE,
    MAGIC,
    PAYLOAD_SIZE_OFFSET,
    ROUTING,
    UINT32,
    VERSION,
    FrameRejected,
    frame_checksum,
    tlv_spans,
)

#: Where a frame's source byte is.
SOURCE_OFFSET = 6
#: The C{allowed} of L{scan_run} when there is no TLV walk.
NO_WALK = b""


def allowed_types(types: frozenset[int]) -> bytes:
    """The C{allowed} of L{scan_run} for a strict walk allowing C{types}."""
    return bytes(1 if t in types else 0 for t in range(256))


def scan_run_python(
    buf: bytes,
    offset: int,
    end: int,
    max_payload: int,
    domain: int,
    source: int,
    last: int,
    verify: bool,
    allowed: bytes,
) -> tuple[int, int, int]:
    """
    Advance from C{offset} over whole frames of C{buf[:end]} whose header is
    intact, whose relay_domain is C{domain}, whose source is C{source}, whose
    sequence follows C{last}, whose CRC-32 matches (if C{verify}) and whose
    TLVs are well formed and of allowed types (if C{allowed}, 256 bytes: non-zero
    at each allowed type; L{NO_WALK} for no walk). Returns C{(offset,
    frames, last)}: where it stopped, how many frames it passed, and the last
    sequence among them.
    """
    unpack = ROUTING.unpack_from
    checksum = UINT32.unpack_from
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
        if verify and frame_checksum(buf, offset, frame_end) != checksum(buf, offset + CHECKSUM_OFFSET)[0]:
            break
        if allowed:
            try:
                if not all(allowed[t] for t, _, _ in tlv_spans(buf, offset + HEADER_SIZE, frame_end)):
                    break
            except FrameRejected:
                break
        frames += 1
        last = sequence
        offset = frame_end
    return offset, frames, last


#: What L{pick_runs} finds for one filter: spans, frames, bytes.
Picked = tuple[list[tuple[int, int]], int, int]


def pick_runs_python(run: bytes, filters: list[tuple[bytes, bytes]]) -> list[Picked]:
    """
    For each filter C{(sources, tlv_types)}, the frames of C{run} (whole
    frames) it wants: from a wanted source (C{sources}: 256 bytes, non-zero
    at each; empty: any) and, if C{tlv_types} (as C{sources}) is given, with
    a TLV of a wanted type before any malformed one. Each answer is
    C{(spans, frames, size)}: the wanted frames as C{(start, end)} offsets,
    side-by-side ones merged, their count and their bytes. The native
    version takes one pass over the frames for all the filters.
    """
    return [_pick_python(run, sources, tlv_types) for sources, tlv_types in filters]


def _pick_python(run: bytes, sources: bytes, tlv_types: bytes) -> Picked:
    spans: list[tuple[int, int]] = []
    frames = size = 0
    offset, end = 0, len(run)
    while offset + HEADER_SIZE <= end:
        frame_end = offset + HEADER_SIZE + UINT32.unpack_from(run, offset + PAYLOAD_SIZE_OFFSET)[0]
        if frame_end > end:
            break
        wanted = not sources or sources[run[offset + SOURCE_OFFSET]]
        if wanted and tlv_types:
            wanted = False
            try:
                for tlv_type, _, _ in tlv_spans(run, offset + HEADER_SIZE, frame_end):
                    if tlv_types[tlv_type]:
                        wanted = True
                        break
            except FrameRejected:
                pass
        if wanted:
            frames += 1
            size += frame_end - offset
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], frame_end)
            else:
                spans.append((offset, frame_end))
        offset = frame_end
    return spans, frames, size


def _native() -> tuple[ModuleType | None, str | None]:
    """The native loops, or why the pure-Python ones run instead."""
    if os.environ.get("TWISTED_RELAY_PURE_PYTHON") == "1":
        return None, "TWISTED_RELAY_PURE_PYTHON=1 asks for it"
    try:
        from . import _cscan  # type: ignore[attr-defined]
    except ImportError:
        return None, "the native scan was not built: no C compiler when the package was installed"
    return _cscan, None


#: The native loops (C{_cscan}), or C{None} and why not.
NATIVE_LOOPS, FALLBACK_REASON = _native()
NATIVE = NATIVE_LOOPS is not None
scan_run = scan_run_python if NATIVE_LOOPS is None else NATIVE_LOOPS.scan_run
pick_runs = pick_runs_python if NATIVE_LOOPS is None else NATIVE_LOOPS.pick_runs
