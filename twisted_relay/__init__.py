"""
twisted_relay: a Twisted relay for Protocol V2 trading messages.

The wire format is in L{twisted_relay.wire}, the domain hook interface in
L{twisted_relay.interfaces}, the shipped domains in L{twisted_relay.domains}
and the C{twistd relay} command in L{twisted_relay.service}.
"""

#: The release, read by the package's metadata (pyproject.toml) too.
__version__ = "0.1.0"
