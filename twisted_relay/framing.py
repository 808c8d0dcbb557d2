"""
Cutting a byte stream into Protocol V2 frames.

One L{Framer} per connection. It scans each received chunk once, header by
header, and hands out whole frames as offsets into one buffer, so callers
forward contiguous slices instead of copying frame by frame. Only the checks
without which the stream cannot be cut (magic, version, size) live here; what
a domain accepts is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterator

from .wire import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTES,
    VERSION,
    BadMagic,
    FrameTooLarge,
    FramingLost,
    Header,
    UnsupportedVersion,
)


class Framer:
    """
    Incremental framer for one stream.

    A partial frame at the end of a chunk is kept for the next one. While the
    rest of a frame whose header is already checked is awaited, reads are
    only appended to one growing buffer and scanned once the frame is
    complete, so a large frame arriving in many small reads costs neither a
    copy nor a Python object per read. A partial header is rescanned on every
    read, so garbage is caught from its first four bytes.

    L{feed} is a generator whose state is saved when it is exhausted: callers
    must consume it to the end (or to the L{FramingLost} it raises).
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_payload_size = max_frame_size - HEADER_SIZE
        #: Stream offset of the first byte not yet consumed as a whole frame.
        self.position = 0
        self._pending = bytearray()
        self._needed = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._pending)

    def feed(self, data: bytes) -> Iterator[tuple[bytes, int, Header]]:
        """
        Yield C{(buffer, start, header)} for each whole frame completed by
        C{data}; the frame is C{buffer[start:start + 32 + payload_size]}. One
        buffer serves every frame of a call. Stream offsets are
        C{self.position + start} until the iteration ends.

        @raise FramingLost: at the first header that cannot be trusted, after
            the whole frames before it were yielded.
        """
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._needed > HEADER_SIZE:
                return
            buf = bytes(pending)
        else:
            buf = data
        end = len(buf)
        offset = 0
        unpack = HEADER.unpack_from
        max_payload = self.max_payload_size
        while end - offset >= HEADER_SIZE:
            fields = unpack(buf, offset)
            if fields[0] != MAGIC or fields[2] != VERSION or fields[7] > max_payload:
                raise self._lost(buf, offset, Header._make(fields))
            frame_end = offset + HEADER_SIZE + fields[7]
            if frame_end > end:
                break
            yield buf, offset, Header._make(fields)
            offset = frame_end
        rest = end - offset
        if rest >= 4 and rest < HEADER_SIZE and buf[offset : offset + 4] != MAGIC_BYTES:
            raise self._lost(buf, offset, None)
        self._pending = bytearray(buf[offset:]) if rest else bytearray()
        self._needed = HEADER_SIZE + fields[7] if rest >= HEADER_SIZE else HEADER_SIZE
        self.position += offset

    def _lost(self, buf: bytes, offset: int, header: Header | None) -> FramingLost:
        """The error for the untrustworthy header at C{buf[offset:]}."""
        raw = bytes(buf[offset : offset + HEADER_SIZE])
        where = self.position + offset
        error: FramingLost
        if header is None or header.magic != MAGIC:
            magic = int.from_bytes(raw[:4], "little")
            error = BadMagic(f"bad magic 0x{magic:08x}", offset=where, header=raw)
        elif header.version != VERSION:
            error = UnsupportedVersion(
                f"unsupported protocol version {header.version} (this relay speaks "
                f"{VERSION})",
                offset=where,
                header=raw,
            )
        else:
            error = FrameTooLarge(
                f"payload_size {header.payload_size} is over this relay's limit of "
                f"{self.max_payload_size} (max frame {self.max_payload_size + HEADER_SIZE}"
                f" bytes)",
                offset=where,
                header=raw,
            )
        return error
