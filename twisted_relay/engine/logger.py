"""
The relay's loggers. Twisted names a class attribute's logger after its
class (C{twisted_relay.engine.relay.RelayFactory}), so twistd tags every
line with forty characters that change whenever a class moves; the relay's
events carry a short namespace of their own instead (C{relay},
C{relay.audit}, C{relay.nats}), which operators can filter and alert on.
"""

from __future__ import annotations

from twisted.logger import Logger


class RelayLogger(Logger):
    """A L{Logger} that keeps the namespace it was given when used as a class attribute."""

    def __get__(self, instance: object, owner: type | None = None) -> RelayLogger:
        return self.__class__(
            self.namespace, owner if instance is None else instance, observer=self.observer
        )
