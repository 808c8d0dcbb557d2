"""
Reading a whole audit log back: every record of every file, checked against
the chain across files, and L{verify}, which reports what it found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .format import AuditDamage, AuditFile, Position, Record, audit_paths


@dataclass
class VerifyReport:
    """What L{verify} found."""

    files: int = 0
    records: int = 0
    head: int = 0
    sequence_holes: list[tuple[int, int, int]] = field(default_factory=list)
    damage: AuditDamage | None = None


class LogReader:
    """
    Every record of the log files C{paths}, oldest first, checked as it is
    read; each file must continue the chain and the record count of the one
    before, so a missing file is damage rather than a silent gap.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        #: Where reading has got to: the end of the chain so far.
        self.end = Position(0, 0, 0)
        self.files = 0

    def __iter__(self) -> Iterator[Record]:
        """@raise AuditDamage: at the first damaged record or file."""
        for path in self.paths:
            yield from self.open(path).records(self.end)

    def open(self, path: str) -> AuditFile:
        """
        The next file, checked to continue the chain of those before it; reading
        goes on from its start.

        @raise AuditDamage: it does not continue them, or its header is damaged.
        """
        audit_file = AuditFile.read(path)
        end = self.end
        if self.files and (audit_file.seed, audit_file.first_index) != (end.crc, end.index):
            raise AuditDamage(
                path,
                audit_file.first_index,
                0,
                f"does not continue the file before it (which ends at record "
                f"{end.index} with checksum 0x{end.crc:08x}): a file is missing "
                f"or altered",
            )
        self.end = audit_file.start()
        self.files += 1
        return audit_file


class LogFollower(LogReader):
    """
    The records of the log in C{directory} as they are written: those there
    now, then each one appended after, across rotations, checked as
    L{LogReader} checks them. A record the relay is writing (the file ends
    part-way through it) is waited for, as is the first file of an empty
    directory. Never ends: the caller stops when it has had enough.

    @param poll: seconds between looks at a log with nothing new.
    @param sleep: how to wait (L{time.sleep}; tests count instead).
    """

    def __init__(
        self, directory: str, poll: float = 0.2, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        super().__init__([])
        self.directory = directory
        self.poll = poll
        self.sleep = sleep

    def __iter__(self) -> Iterator[Record]:
        """@raise AuditDamage: at the first damaged record or file."""
        current: AuditFile | None = None
        while True:
            paths = audit_paths(self.directory)
            if current is None:
                if not paths:
                    self.sleep(self.poll)
                    continue
                current = self.open(paths[0])
            # Listed before reading: a file after this one means it was finished.
            newer = [path for path in paths if path > current.path]
            yield from self._appended(current)
            if newer:
                current = self.open(newer[0])
            else:
                self.sleep(self.poll)

    def _appended(self, audit_file: AuditFile) -> Iterator[Record]:
        """The records of C{audit_file} from where reading got to; a record being written waits."""
        try:
            yield from audit_file.records(self.end)
        except AuditDamage as damage:
            if not damage.torn:
                raise


def verify(directory: str) -> VerifyReport:
    """Check every record of the log in C{directory}, and the chain across its files."""
    report = VerifyReport()
    reader = LogReader(audit_paths(directory))
    last: dict[int, int] = {}
    try:
        for record in reader:
            source, sequence = record.source, record.sequence
            previous = last.get(source)
            if previous is not None and sequence > previous + 1:
                report.sequence_holes.append((source, previous, sequence))
            last[source] = sequence
            report.records += 1
    except AuditDamage as damage:
        report.damage = damage
    report.files = reader.files
    report.head = reader.end.crc
    return report
