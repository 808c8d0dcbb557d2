"""
The interfaces between the relay engine and what plugs into it.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "DELIVERY_POLICIES",
    "IRelayLogic",
]

#: Names of the slow-consumer policies a domain may ask for.
DELIVERY_POLICIES = ("drop", "disconnect", "block")


class IRelayLogic(Interface):
    """
    What makes one relay domain differ from another; the engine is the same.

    A third party adds a domain by providing this interface (and
    L{twisted.plugin.IPlugin}) from a module in a C{twisted/plugins/}
    directory on the Python path; C{twistd relay --domain NAME} finds it.
    """

    domain = Attribute("The relay_domain number (int) of the frames it carries.")
    name = Attribute("The name given to --domain (str), e.g. 'market'.")
    socket_path = Attribute("Default Unix socket path (str) when --listen is not given.")
    max_frame_size = Attribute("Largest frame accepted (int, bytes, header included).")
    verify_checksum = Attribute("Whether each frame's CRC-32 is verified (bool).")
    strict_tlv = Attribute(
        "Whether each payload is walked as TLVs, which must fill it exactly and "
        "be of allowed_tlv_types (bool)."
    )
    allowed_tlv_types = Attribute("TLV types accepted when strict_tlv (frozenset of int).")
    delivery = Attribute("Slow-consumer policy name: one of DELIVERY_POLICIES.")
    audit = Attribute(
        "Whether the relay keeps a write-ahead audit log by default (bool)."
    )
    restrict_publishers = Attribute(
        "Whether only the relay's own user and the --allow-publish entries may "
        "publish by default, rather than anyone who can connect (bool)."
    )

    def should_forward(header):
        """
        Whether the frame with this L{twisted_relay.wire.Header} belongs on
        this relay; a refused frame is counted and logged as 'filtered'.
        """

    def initialize():
        """Acquire what the domain needs before the first client connects."""

    def cleanup():
        """Release what initialize() acquired, once the listeners are closed."""
