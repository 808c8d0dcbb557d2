"""
Cutting a byte stream into Protocol V2 frames.

One L{Framer} per connection holds what is left of the stream between reads
and knows the checks without which a stream cannot be cut (magic, version,
size). Scanning is done by its users, one pass over each chunk: L{frames}
for clients, and the relay's own loop, which folds its routing into the same
pass (see L{twisted_relay.protocol}). Both hand out frames as offsets into one
buffer, so whole runs of frames can be forwarded as single slices.
"""

from __future__ import annotations

from collections.abc import Iterator

from .wire import (
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTES,
    PAYLOAD_SIZE_OFFSET,
    UINT32,
    VERSION,
    BadMagic,
    FrameTooLarge,
    FramingLost,
    Header,
    UnsupportedVersion,
    unpack_header,
)


class Framer:
    """
    The stream state of one connection.

    A partial frame at the end of a chunk is kept for the next one. While the
    rest of a frame whose header is already checked is awaited, reads are only
    appended to one growing buffer and scanned once the frame is complete, so
    a large frame arriving in many small reads costs neither a copy nor a
    Python object per read. A partial header is rescanned on every read, so
    garbage is caught from its first four bytes.

    Use: C{buf = framer.take(data)}; if not C{None}, scan C{buf} from offset
    0 frame by frame, refusing a header with L{lost}; then
    C{framer.keep(buf, offset)} with the offset where scanning stopped.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_payload_size = max_frame_size - HEADER_SIZE
        #: Stream offset of the first byte of the buffer being scanned.
        self.position = 0
        self._pending = bytearray()
        self._needed = HEADER_SIZE

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._pending)

    def take(self, data: bytes) -> bytes | None:
        """
        The buffer to scan after receiving C{data}: C{data} itself when
        nothing was pending (no copy), or C{None} when the frame being
        collected is still incomplete.
        """
        pending = self._pending
        if not pending:
            return data
        pending += data
        if len(pending) < self._needed > HEADER_SIZE:
            return None
        return bytes(pending)

    def keep(self, buf: bytes, offset: int) -> None:
        """
        Scanning of C{buf} stopped at C{offset}: hold the rest for later.

        @raise FramingLost: the rest starts with four bytes that are not
            the magic.
        """
        rest = len(buf) - offset
        if not rest:
            self._pending = bytearray()
            self._needed = HEADER_SIZE
        else:
            if rest < HEADER_SIZE:
                if rest >= 4 and buf[offset : offset + 4] != MAGIC_BYTES:
                    raise self.lost(buf, offset)
                self._needed = HEADER_SIZE
            else:
                size = UINT32.unpack_from(buf, offset + PAYLOAD_SIZE_OFFSET)[0]
                self._needed = HEADER_SIZE + size
            self._pending = bytearray(buf[offset:])
        self.position += offset

    def frames(self, data: bytes) -> Iterator[tuple[bytes, int, Header]]:
        """
        Yield C{(buffer, start, header)} for each whole frame completed by
        C{data}; the frame is C{buffer[start:start + 32 + payload_size]}.
        Consume the iterator to its end (or to the L{FramingLost} it raises):
        the stream state is saved there.
        """
        buf = self.take(data)
        if buf is None:
            return
        end, offset = len(buf), 0
        while end - offset >= HEADER_SIZE:
            header = unpack_header(buf, offset)
            if (
                header.magic != MAGIC
                or header.version != VERSION
                or header.payload_size > self.max_payload_size
            ):
                raise self.lost(buf, offset)
            frame_end = offset + HEADER_SIZE + header.payload_size
            if frame_end > end:
                break
            yield buf, offset, header
            offset = frame_end
        self.keep(buf, offset)

    def lost(self, buf: bytes, offset: int) -> FramingLost:
        """The error for the untrustworthy header at C{buf[offset:]}."""
        raw = bytes(buf[offset : offset + HEADER_SIZE])
        where = self.position + offset
        magic = int.from_bytes(raw[:4], "little")
        if magic != MAGIC:
            return BadMagic(f"bad magic 0x{magic:08x}", offset=where, header=raw)
        header = unpack_header(raw)
        if header.version != VERSION:
            return UnsupportedVersion(
                f"unsupported protocol version {header.version} (this relay speaks "
                f"{VERSION})",
                offset=where,
                header=raw,
            )
        return FrameTooLarge(
            f"payload_size {header.payload_size} is over this relay's limit of "
            f"{self.max_payload_size} (max frame {self.max_payload_size + HEADER_SIZE}"
            f" bytes)",
            offset=where,
            header=raw,
        )
