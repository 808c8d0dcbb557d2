"""
The floor: a relay written the way Twisted's IntNStringReceiver frames a
stream (one buffer, an integer offset, a precompiled struct), delivering each
frame with one transport.write per frame per client. No validation beyond
what framing needs. What a straightforward Twisted relay achieves.

    python -m benchmarks.baselines.floor unix:/tmp/floor.sock
"""

from __future__ import annotations

import struct
import sys

from . import BaselineClient, serve

PAYLOAD_SIZE = struct.Struct("<I")
HEADER_SIZE = 32


class FloorProtocol(BaselineClient):
    _unprocessed = b""

    def dataReceived(self, data: bytes) -> None:
        alldata = self._unprocessed + data
        offset = 0
        unpack = PAYLOAD_SIZE.unpack_from
        while len(alldata) >= offset + HEADER_SIZE:
            (size,) = unpack(alldata, offset + 24)
            end = offset + HEADER_SIZE + size
            if len(alldata) < end:
                break
            frame = alldata[offset:end]
            offset = end
            for client in self.factory.clients:
                if client is not self:
                    client.transport.write(frame)
        self._unprocessed = alldata[offset:]


if __name__ == "__main__":
    serve(FloorProtocol, sys.argv[1])
