"""
The ceiling: a bulk forwarder that writes every chunk it reads to every other
client without looking at it. No framing, no checks, no counters: the upper
bound for any relay on Twisted's reactor on this machine.

    python -m benchmarks.baselines.ceiling unix:/tmp/ceiling.sock
"""

from __future__ import annotations

import sys

from . import BaselineClient, serve


class CeilingProtocol(BaselineClient):
    def dataReceived(self, data: bytes) -> None:
        for client in self.factory.clients:
            if client is not self:
                client.transport.write(data)


if __name__ == "__main__":
    serve(CeilingProtocol, sys.argv[1])
