"""
The applications on top of the engine: the C{twistd relay} / C{twist relay}
tap and its services, the endpoints it listens on, and the status site.
"""
