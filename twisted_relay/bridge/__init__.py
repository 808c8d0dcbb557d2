"""
The NATS bridge (C{--nats}): the relay's broadcast to and from relays on
other hosts. nats-py is imported only inside this package.
"""
