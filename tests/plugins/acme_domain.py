"""
A third-party relay domain, declared the way an outside package would: one
object in a plugin module, no change to the engine.
"""

from twisted_relay.domains import RelayDomain

acme = RelayDomain(
    domain=9,
    name="acme",
    aliases=("acme_fx",),
    socket_path="/tmp/torq/acme.sock",
    max_frame_size=4096,
    verify_checksum=True,
    strict_tlv=False,
    delivery="drop",
)
