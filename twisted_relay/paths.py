"""
Where the relay puts its sockets and its audit log: directories it makes
private, and trusts only if no other user can change them.
"""

from __future__ import annotations

import os
import pwd
import stat


class UntrustedDirectory(Exception):
    """A directory on the way to a socket or the audit log that others could change."""


def check_directory(path: str, uid: int | None = None) -> None:
    """
    Trust C{path} (a directory, or where one will be created) only if
    nobody but C{uid} (default: this process's user) and root can change
    it: every directory from it (or its nearest existing ancestor) up to
    C{/} must be owned by C{uid} or root, and writable by neither group nor
    others unless sticky and root's (C{/tmp} itself), as OpenSSH's
    C{StrictModes} checks a user's files. Otherwise another local user
    could rename the relay's socket away and bind their own, or lock the
    audit directory first.

    @raise UntrustedDirectory: with one line naming the directory and why.
    """
    uid = os.geteuid() if uid is None else uid
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        current = os.path.dirname(current)
    current = os.path.realpath(current)
    while True:
        info = os.stat(current)
        if info.st_uid not in (0, uid):
            raise UntrustedDirectory(
                f"{current} belongs to {_user(info.st_uid)}, not to this relay's user "
                f"({_user(uid)}) or root: that user could replace what the relay puts there"
            )
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (info.st_mode & stat.S_ISVTX and info.st_uid == 0):
            raise UntrustedDirectory(
                f"{current} is writable by {'its group' if writable & stat.S_IWGRP else 'others'}"
                f" (mode {stat.S_IMODE(info.st_mode):04o}): they could replace what the relay "
                f"puts there"
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def make_directories(path: str, mode: int = 0o755) -> None:
    """
    Create C{path} and its missing parents with exactly C{mode} (less any
    write permission for group or others), whatever the umask
    (C{os.makedirs} leaves the parents to it, and the umask can add
    permissions to none of them).
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        # Not left to the umask: 0077 (twistd's when it daemonizes) would keep
        # a socket's group out, 0002 would let the group in.
        os.chmod(directory, mode & ~0o022)
