"""
TLS listeners that require a client certificate, so a relay reached over
the network knows who is on the other end (the certificate's common name,
matched by C{cn:NAME} in the access lists).

Twisted's C{ssl:} server endpoint string takes no certificate authority for
clients; the relay adds one parameter to it, C{caCerts=PATH}, a PEM file of
the authorities whose client certificates it accepts::

    ssl:7003:interface=10.0.0.5:privateKey=relay.key:certKey=relay.crt:caCerts=clients-ca.pem
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import SSL4ServerEndpoint, _parse
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    trustRootFromCertificates,
)

CA_CERTS = "caCerts"
#: The ssl: parameters a client-certificate listener takes.
_SUPPORTED = {"port", "interface", "backlog", "privateKey", "certKey", CA_CERTS}
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def wants_client_certificates(description: str) -> bool:
    return description.startswith("ssl:") and f"{CA_CERTS}=" in description


def client_certificate_endpoint(reactor: IReactorSSL, description: str) -> SSL4ServerEndpoint:
    """
    The endpoint for an C{ssl:} description with C{caCerts=PATH}: its
    handshake fails for a client without a certificate signed by one of
    those authorities.

    @raise ValueError: a parameter is missing, unknown or unreadable.
    """
    args, kwargs = _parse(description)
    if len(args) > 1:
        kwargs.setdefault("port", args[1])
    unknown = set(kwargs) - _SUPPORTED
    if unknown:
        raise ValueError(
            f"{', '.join(sorted(unknown))} cannot be combined with {CA_CERTS}= "
            f"(supported: {', '.join(sorted(_SUPPORTED))})"
        )
    if "port" not in kwargs:
        raise ValueError("no port given")
    private_key = kwargs.get("privateKey", "server.pem")
    try:
        with open(kwargs.get("certKey", private_key), "rb") as f:
            certificate = f.read()
        with open(private_key, "rb") as f:
            key = f.read()
        with open(kwargs[CA_CERTS], "rb") as f:
            authorities = _PEM_CERTIFICATE.findall(f.read())
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    if not authorities:
        raise ValueError(f"{kwargs[CA_CERTS]} holds no PEM certificate")
    own = PrivateCertificate.loadPEM(certificate + b"\n" + key)
    options = CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        # A trust root makes the server ask for, and require, a client certificate.
        trustRoot=trustRootFromCertificates([Certificate.loadPEM(pem) for pem in authorities]),
    )
    return SSL4ServerEndpoint(
        reactor,
        int(kwargs["port"]),
        options,
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )
