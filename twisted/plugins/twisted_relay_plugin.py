"""
The C{twistd relay} command. This file only names the module that holds the
options and the service, so that listing twistd's commands stays cheap.
"""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "twisted_relay",
    "twisted_relay.app.tap",
    "Relay Protocol V2 trading messages between the services of one domain.",
    "relay",
)
