"""
Who may connect: the peer of each connection (its Unix credentials from
C{SO_PEERCRED}, or the common name of its verified TLS client certificate),
and the lists of peers allowed to publish and to subscribe.

An entry of a list is C{uid:NAME}, C{gid:NAME} (a user or group name or
number; a group also admits its members), C{cn:NAME} (a TLS client
certificate's common name), or C{any}.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from twisted.internet.interfaces import ISSLTransport, ITransport

from .wire import FramingLost

if TYPE_CHECKING:
    from OpenSSL.crypto import X509

_PEERCRED = struct.Struct("3i")


class NotAllowedToPublish(FramingLost):
    """A client that may only subscribe sent a frame to publish: it is closed."""

    reason = "not_allowed_to_publish"


@dataclass(frozen=True)
class Peer:
    """The other end of a connection, as far as the relay can prove it."""

    description: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    common_name: str | None = None


def peer_of(transport: ITransport) -> Peer:
    """
    Who is on the other end: the process id, uid and gid of a Unix socket
    peer, the certificate's common name of a TLS peer whose handshake is
    done, or else just the address of a network peer.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if (
        isinstance(handle, socket.socket)
        and handle.family == socket.AF_UNIX
        and hasattr(socket, "SO_PEERCRED")
    ):
        creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(creds)
        return Peer(f"pid {pid} uid {uid} gid {gid}", pid, uid, gid)
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    address = f"{host}:{port}" if host is not None else str(peer)
    certificate = cast(
        "X509 | None",
        transport.getPeerCertificate() if ISSLTransport.providedBy(transport) else None,
    )
    if certificate is None:
        return Peer(address)
    name = certificate.get_subject().commonName
    return Peer(f"{address} certificate CN={name}", common_name=name)


class AccessList:
    """Peers allowed to do one thing (publish, or subscribe)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        self.uids: set[int] = set()
        self.gids: set[int] = set()
        self.names: set[str] = set()
        self.anyone = False
        for entry in self.entries:
            kind, _, name = entry.partition(":")
            if entry == "any":
                self.anyone = True
            elif kind == "uid" and name:
                self.uids.add(_id(name, lambda n: pwd.getpwnam(n).pw_uid, "user"))
            elif kind == "gid" and name:
                self.gids.add(_id(name, lambda n: grp.getgrnam(n).gr_gid, "group"))
            elif kind == "cn" and name:
                self.names.add(name)
            else:
                raise ValueError(f"{entry!r} is not uid:NAME, gid:NAME, cn:NAME or any")

    @classmethod
    def own_uid_and(cls, entries: Iterable[str]) -> AccessList:
        """The relay's own user, and C{entries}."""
        return cls([f"uid:{os.getuid()}", *entries])

    def allows(self, peer: Peer) -> bool:
        if self.anyone:
            return True
        if peer.common_name is not None and peer.common_name in self.names:
            return True
        if peer.uid is None:
            return False
        if peer.uid in self.uids or peer.gid in self.gids:
            return True
        return bool(self.gids) and _member_of(peer.uid, self.gids)

    def __str__(self) -> str:
        return " ".join(self.entries)


def _id(name: str, lookup, kind: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}") from None


def _member_of(uid: int, gids: set[int]) -> bool:
    """Whether the user C{uid} is a listed member of one of the groups C{gids}."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    for gid in gids:
        try:
            if user in grp.getgrgid(gid).gr_mem:
                return True
        except KeyError:
            continue
    return False


@dataclass(frozen=True)
class Access:
    """Who may publish and who may subscribe; C{None} admits every peer."""

    publish: AccessList | None = None
    subscribe: AccessList | None = None

    def may_publish(self, peer: Peer) -> bool:
        return self.publish is None or self.publish.allows(peer)

    def may_subscribe(self, peer: Peer) -> bool:
        return self.subscribe is None or self.subscribe.allows(peer)

