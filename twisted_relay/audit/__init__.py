"""
The write-ahead audit log: every frame the relay accepts, appended before it
is fanned out, in files that are only ever appended to. No Twisted here, so
the offline tools (C{twisted-relay replay}, C{audit verify}) read it too.

The layout is in L{twisted_relay.audit.format}, reading a whole log back in
L{twisted_relay.audit.reader}, appending in L{twisted_relay.audit.writer};
this module is their public surface.
"""

from .format import (
    RECORD_OVERHEAD,
    ROTATE_SIZE,
    AuditDamage,
    AuditFile,
    Position,
    Record,
    audit_files,
    audit_paths,
)
from .reader import LogFollower, LogReader, VerifyReport, verify
from .writer import AuditLog, audit_records, audit_records_python

__all__ = [
    "RECORD_OVERHEAD",
    "ROTATE_SIZE",
    "AuditDamage",
    "AuditFile",
    "AuditLog",
    "LogFollower",
    "LogReader",
    "Position",
    "Record",
    "VerifyReport",
    "audit_files",
    "audit_paths",
    "audit_records",
    "audit_records_python",
    "verify",
]
