"""
Tests for the audit commands of C{twisted-relay} (L{twisted_relay.cli}):
C{replay} of an audit log, printed or republished to a real relay, and
C{audit verify}, on logs written by the relay's own L{AuditLog}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone

import pytest

from twisted_relay.audit import RECORD_OVERHEAD, AuditFile, AuditLog, audit_paths
from twisted_relay.cli import describe, main
from twisted_relay.client import BlockingClient
from twisted_relay.wire import build_frame, unpack_header

from .relayprocess import RelayProcess

#: Received time of the first record: 2026-11-25T14:00:00 UTC; one record a second.
BASE_NS = int(datetime(2026, 11, 25, 14, tzinfo=timezone.utc).timestamp()) * 10**9
SECOND = 10**9
COUNT = 40


def frame(source: int, sequence: int) -> bytes:
    return build_frame(3, source, sequence, [(40, b"x" * 20)])


#: The records written by L{write_log}: sources 42 and 41 in turn, each from sequence 1.
RECORDS = [
    {"index": i, "source": 42 - i % 2, "sequence": i // 2 + 1,
     "received_ns": BASE_NS + i * SECOND, "client_id": i % 3 + 1}
    for i in range(COUNT)
]
FRAMES = [frame(r["source"], r["sequence"]) for r in RECORDS]
RECORD_SIZE = RECORD_OVERHEAD + len(FRAMES[0])


def write_log(directory: str, frames: list[bytes] = FRAMES) -> int:
    """Audit C{frames} one record per append, rotating every ~13 records; the chain head."""
    log = AuditLog(directory, rotate_size=1000)
    log.open()
    for record, data in zip(RECORDS, frames):
        log.append(record["client_id"], [data], record["received_ns"])
    head = log.head
    log.close()
    return head


@pytest.fixture
def log_dir(tmp_path) -> str:
    directory = str(tmp_path / "audit")
    write_log(directory)
    assert len(audit_paths(directory)) >= 3
    return directory


def damage_middle_file(directory: str) -> tuple[str, int, int]:
    """Flip a payload byte of the third record of the middle file; its path, index and offset."""
    path = audit_paths(directory)[1]
    audit_file = AuditFile.read(path)
    offset = audit_file.header_size + 2 * RECORD_SIZE
    with open(path, "r+b") as f:
        f.seek(offset + RECORD_OVERHEAD + 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path, audit_file.first_index + 2, offset


def replayed(capsys, *args: str) -> list[dict]:
    assert main(["replay", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_replay_json(log_dir, capsys):
    """--json shows every record across the files, in order, with its exact frame."""
    lines = replayed(capsys, log_dir)
    assert [{k: line[k] for k in RECORDS[0]} for line in lines] == RECORDS
    assert [bytes.fromhex(line["frame"]) for line in lines] == FRAMES
    assert {(line["relay_domain"], line["size"]) for line in lines} == {(3, len(FRAMES[0]))}


def test_replay_lines(log_dir, capsys):
    """Without --json, a frame is its record index, its receive time, its client and the tap line."""
    assert main(["replay", log_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == COUNT
    received = datetime.fromtimestamp(RECORDS[7]["received_ns"] / 1e9, timezone.utc)
    assert lines[7] == (
        f"#7 received {received:%Y-%m-%dT%H:%M:%S.%fZ} client 2  "
        f"{describe(unpack_header(FRAMES[7]), FRAMES[7], False)}"
    )


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        (["--source", "41"], lambda r: r["source"] == 41),
        (["--source", "41", "--source", "42"], lambda r: True),
        (["--source", "7"], lambda r: False),
        (["--from-sequence", "5", "--to-sequence", "7"], lambda r: 5 <= r["sequence"] <= 7),
        (["--from-sequence", "19"], lambda r: r["sequence"] >= 19),
        (["--since", str(BASE_NS + 10 * SECOND), "--until", str(BASE_NS + 12 * SECOND)],
         lambda r: 10 <= r["index"] <= 12),
        (["--since", "2026-11-25T14:00:10", "--until", "2026-11-25T14:00:12.000000+00:00"],
         lambda r: 10 <= r["index"] <= 12),
        (["--since", "2026-11-25T15:00:30+01:00"], lambda r: r["index"] >= 30),
        (["--until", str(BASE_NS + 12 * SECOND - 1)], lambda r: r["index"] < 12),
        (["--source", "42", "--since", "2026-11-25T14:00:09.5"],
         lambda r: r["source"] == 42 and r["index"] >= 10),
    ],
)
def test_replay_filters(log_dir, capsys, args, kept):
    """The filters keep exactly the records that match all of them, bounds included."""
    lines = replayed(capsys, log_dir, *args)
    assert [line["index"] for line in lines] == [r["index"] for r in RECORDS if kept(r)]


def test_verify_good(tmp_path, capsys):
    """A whole log: exit status 0, the file and record counts and the chain head."""
    directory = str(tmp_path / "audit")
    head = write_log(directory)
    assert main(["audit", "verify", directory]) == 0
    assert capsys.readouterr().out == (
        f"ok: {len(audit_paths(directory))} files, {COUNT} records, chain head 0x{head:08x}\n"
    )


def test_verify_sequence_holes(tmp_path, capsys):
    """Holes in a source's sequences are warned of, but are not damage."""
    directory = str(tmp_path / "audit")
    frames = [frame(r["source"], r["sequence"] + (r["index"] >= 20)) for r in RECORDS]
    write_log(directory, frames)
    assert main(["audit", "verify", directory]) == 0
    out = capsys.readouterr().out
    assert "warning: 2 sequence holes (not damage):" in out
    assert "  source 42: sequence jumps from 10 to 12\n" in out
    assert "  source 41: sequence jumps from 10 to 12\n" in out


def test_verify_altered_record(log_dir, capsys):
    """A changed byte: exit status 1, naming the file, the record and its offset."""
    path, index, offset = damage_middle_file(log_dir)
    assert main(["audit", "verify", log_dir]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"damaged: {path}: record {index} at byte {offset}: checksum")
    assert out[1] == f"{index} records verified before the damage"


def test_verify_missing_file(log_dir, capsys):
    """A removed middle file: exit status 1, naming the file after it."""
    paths = audit_paths(log_dir)
    os.unlink(paths[1])
    assert main(["audit", "verify", log_dir]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"damaged: {paths[2]}: record {AuditFile.read(paths[2]).first_index}")
    assert "a file is missing" in out


def test_replay_altered_record(log_dir, capsys):
    """replay prints the records before the damage, then fails with one line naming it."""
    path, index, offset = damage_middle_file(log_dir)
    assert main(["replay", log_dir, "--json"]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == list(range(index))
    assert err.count("\n") == 1
    assert f"damaged: {path}: record {index} at byte {offset}" in err


def test_replay_missing_file(log_dir, capsys):
    """replay stops at a missing file rather than skipping its records."""
    paths = audit_paths(log_dir)
    missing = AuditFile.read(paths[1]).first_index
    os.unlink(paths[1])
    assert main(["replay", log_dir, "--json"]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == list(range(missing))
    assert f"{paths[2]}: record" in err and "a file is missing" in err


@pytest.mark.parametrize("command", [["replay"], ["audit", "verify"]])
def test_no_log(tmp_path, capsys, command):
    """A missing directory or one without audit files: one line and exit status 1."""
    for directory, message in [
        (tmp_path / "none", "cannot read the audit directory"),
        (tmp_path, "no audit files in"),
    ]:
        assert main([*command, str(directory)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and message in err


@pytest.fixture
def relay_socket():
    """An execution relay on a short Unix socket path; the path. Stopped afterwards."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "r.sock")
    relay = RelayProcess(workdir, "--domain", "execution", "--listen", f"unix:{path}")
    try:
        relay.start().wait_listening()
        yield path
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_replay_to_relay(log_dir, relay_socket, capsys):
    """--to republishes the kept frames byte for byte, in log order, to a subscriber."""
    with BlockingClient(relay_socket) as subscriber:
        subscriber.introduce()
        code = main(["replay", log_dir, "--to", f"unix:{relay_socket}", "--domain", "execution",
                     "--source", "42"])
        assert code == 0
        kept = FRAMES[::2]
        assert capsys.readouterr().out == (
            f"republished {len(kept)} frames ({len(b''.join(kept)):,} bytes) "
            f"to unix:{relay_socket}; the relay accepted all {len(kept)}\n"
        )
        assert [data for _, data in subscriber.receive(len(kept), timeout=10)] == kept
        assert subscriber.receive(1, timeout=0.2) == []


def test_replay_to_relay_of_another_domain(log_dir, relay_socket, capsys):
    """--to a relay that is not of --domain: one line, nothing sent."""
    assert main(["replay", log_dir, "--to", relay_socket, "--domain", "market"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"twisted-relay: the relay at {relay_socket} is the execution relay (domain 3), "
        f"not market: use --domain execution\n"
    )
