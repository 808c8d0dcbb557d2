"""
How the bridge reaches NATS: the servers, the credentials and TLS, read
from files or the environment rather than the command line (where C{ps}
shows them to every user), and the servers as the relay shows them, with
no credentials.

No nats-py here: the options check these settings before the bridge, and
nats-py with it, is imported.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """C{url} with any user, password or token in it replaced by C{***}."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _secret(path: str, what: str) -> str:
    """The first line of the file at C{path}, which must hold C{what}."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if not value:
        raise ValueError(f"{path} is empty: it should hold {what}")
    return value


def _readable(path: str) -> str:
    """C{path}, once it is known to be a file the relay can read."""
    try:
        with open(path, "rb"):
            return path
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class NatsConnection:
    """
    The servers and the one way of authenticating the bridge uses: none,
    user and password, a token, or a C{.creds} file (a JWT and its NKEY
    seed), over TLS if a CA or a client certificate is given.
    """

    servers: list[str]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_options(
        cls,
        servers: list[str],
        *,
        user_file: str | None = None,
        token_file: str | None = None,
        creds: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> NatsConnection:
        """
        Settings from the options, or C{NATS_USER} and C{NATS_PASSWORD}, or
        C{NATS_TOKEN}, from C{environ}; C{ValueError} says what is wrong.
        """
        if not servers:
            raise ValueError("--nats: no server given")
        user = password = token = None
        if user_file is not None:
            user, colon, password = _secret(user_file, "USER:PASSWORD").partition(":")
            if not (user and colon and password):
                raise ValueError(f"{user_file} should hold USER:PASSWORD on its first line")
        elif environ.get("NATS_USER") or environ.get("NATS_PASSWORD"):
            user, password = environ.get("NATS_USER"), environ.get("NATS_PASSWORD")
            if not (user and password):
                raise ValueError("NATS_USER and NATS_PASSWORD go together: one is not set")
        if token_file is not None:
            token = _secret(token_file, "the token")
        elif environ.get("NATS_TOKEN"):
            token = environ["NATS_TOKEN"]
        ways = [
            name
            for name, given in (
                ("a user and password", user),
                ("a token", token),
                ("--nats-creds", creds),
                ("credentials in a --nats URL", any("@" in redact(url) for url in servers)),
            )
            if given
        ]
        if len(ways) > 1:
            raise ValueError(f"give one way to authenticate to NATS, not {' and '.join(ways)}")
        if creds is not None and importlib.util.find_spec("nkeys") is None:
            raise ValueError("--nats-creds needs NKEY signing: pip install 'nats-py[nkeys]'")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        settings = cls(
            servers,
            user=user,
            password=password,
            token=token,
            creds=None if creds is None else _readable(creds),
            tls_ca=None if tls_ca is None else _readable(tls_ca),
            tls_cert=None if tls_cert is None else _readable(tls_cert),
            tls_key=None if tls_key is None else _readable(tls_key),
        )
        settings.tls()  # a certificate that does not load is a mistake of the command line
        return settings

    @property
    def shown(self) -> list[str]:
        """The servers as logs, /health and status show them: no credentials."""
        return [redact(url) for url in self.servers]

    @property
    def described(self) -> str:
        """How the bridge authenticates, and whether over TLS, for the log."""
        if self.creds:
            how = f"credentials file {self.creds}"
        elif self.user:
            how = f"user {self.user}"
        elif self.token:
            how = "token"
        else:
            how = "credentials in the URL" if self.shown != self.servers else "no credentials"
        tls = self.tls_ca is not None or self.tls_cert is not None or any(
            url.startswith("tls://") for url in self.servers
        )
        return f"{how}, TLS" if tls else how

    def tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS, if any TLS setting is given (C{ValueError} if it fails)."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"the NATS TLS settings do not load: {e}") from None
        return context

    def connect_arguments(self) -> dict[str, Any]:
        """The keyword arguments of C{nats.connect} that carry these settings."""
        arguments: dict[str, Any] = {"servers": self.servers}
        if self.user is not None:
            arguments.update(user=self.user, password=self.password)
        if self.token is not None:
            arguments["token"] = self.token
        if self.creds is not None:
            arguments["user_credentials"] = self.creds
        context = self.tls()
        if context is not None:
            arguments["tls"] = context
        return arguments
