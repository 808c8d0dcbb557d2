"""
Write the adversarial corpus: one file per bad (or borderline) input, each
what one client sends on its own connection, and C{manifest.json}, the
domain each is sent to and the outcome the relay must give it (see
tests/test_adversarial.py). Run from the repository's root:

    .venv/bin/python -m tests.corpus.make_corpus
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib

from twisted_relay.wire import CHECKED_HEADER_SIZE, HEADER, HEADER_SIZE, Domain, build_frame

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = {"market": 1, "signal": 2, "execution": 3}
#: A TLV type each domain allows, and one the strict domains do not.
ALLOWED = {"market": 1, "signal": 20, "execution": 40}
UNKNOWN = 7


def sealed(frame: bytes | bytearray) -> bytes:
    """C{frame} with its CRC-32 recomputed, so the one defect made is the only one."""
    frame = bytearray(frame)
    crc = zlib.crc32(frame[HEADER_SIZE:], zlib.crc32(frame[:CHECKED_HEADER_SIZE]))
    frame[CHECKED_HEADER_SIZE:HEADER_SIZE] = struct.pack("<I", crc)
    return bytes(frame)


def unsealed(frame: bytes) -> bytes:
    """C{frame} with a checksum of 0, which matches no frame here."""
    return frame[:CHECKED_HEADER_SIZE] + bytes(4) + frame[HEADER_SIZE:]


def good(domain: str, payload: bytes | None = None, *, sequence: int = 1, source: int = 9) -> bytes:
    tlvs = [(ALLOWED[domain], b"ok")] if payload is None else payload
    return build_frame(DOMAINS[domain], source, sequence, tlvs, timestamp=1)


def header_field(domain: str, field: int, value: int) -> bytes:
    """A good frame of C{domain} with header field number C{field} set to C{value}, resealed."""
    frame = bytearray(good(domain))
    fields = list(HEADER.unpack_from(frame))
    fields[field] = value
    HEADER.pack_into(frame, 0, *fields)
    return sealed(frame)


def payload(domain: str, raw: bytes) -> bytes:
    return good(domain, raw)


def cases() -> dict[str, tuple[str, str, bytes]]:
    """name: (domain, expected outcome, bytes)."""
    garbage = random.Random(15).randbytes(4096)
    big = 32 * 1024 - HEADER_SIZE
    return {
        # The header, field by field, at and past its boundaries.
        "magic-zero": ("market", "closed:bad_magic", header_field("market", 0, 0)),
        "magic-off-by-one": ("market", "closed:bad_magic", header_field("market", 0, 0xDEADBEEE)),
        "domain-zero": ("signal", "rejected:filtered", header_field("signal", 1, 0)),
        "domain-255": ("signal", "rejected:filtered", header_field("signal", 1, 255)),
        "domain-other": ("market", "rejected:filtered", good("signal")),
        "version-zero": ("signal", "closed:unsupported_version", header_field("signal", 2, 0)),
        "version-two": ("signal", "closed:unsupported_version", header_field("signal", 2, 2)),
        "version-255": ("execution", "closed:unsupported_version", header_field("execution", 2, 255)),
        "source-zero": ("signal", "forwarded", good("signal", source=0)),
        "source-255": ("signal", "forwarded", good("signal", source=255)),
        "flags-255": ("signal", "forwarded", header_field("signal", 4, 255)),
        "sequence-zero": ("signal", "forwarded", good("signal", sequence=0)),
        "sequence-max": ("execution", "forwarded", good("execution", sequence=2**64 - 1)),
        "timestamp-max": ("signal", "forwarded", header_field("signal", 6, 2**64 - 1)),
        "payload-empty": ("signal", "forwarded", good("signal", b"")),
        "payload-at-max": ("signal", "forwarded", good("signal", [(20, b"m" * (big - 5))])),
        "payload-over-max": ("signal", "closed:frame_too_large", good("signal", [(20, b"m" * (big - 4))])),
        "payload-size-u32-max": ("market", "closed:frame_too_large", header_field("market", 7, 2**32 - 1)),
        "checksum-wrong": ("signal", "rejected:bad_checksum", good("signal")[:-1] + b"X"),
        "checksum-zero": ("execution", "rejected:bad_checksum", unsealed(good("execution"))),
        # Every TLV defect, on the strict domains.
        "tlv-unknown-type": ("signal", "rejected:unknown_tlv_type", payload("signal", bytes([UNKNOWN, 1, 0]))),
        "tlv-no-length": ("signal", "rejected:truncated_tlv", payload("signal", bytes([20]))),
        "tlv-overruns": ("execution", "rejected:truncated_tlv", payload("execution", bytes([40, 9, 1, 2]))),
        "tlv-extended-cut": ("signal", "rejected:truncated_tlv", payload("signal", bytes([255, 0, 20]))),
        "tlv-extended-reserved": ("signal", "rejected:bad_tlv", payload("signal", bytes([255, 1, 20, 1, 0, 0]))),
        "tlv-extended-overruns": ("execution", "rejected:truncated_tlv", payload("execution", bytes([255, 0, 40, 0xFF, 0xFF, 0]))),
        "tlv-second-bad": ("signal", "rejected:truncated_tlv", payload("signal", bytes([20, 1, 0, 20]))),
        "tlv-garbage-on-market": ("market", "forwarded", payload("market", bytes([255, 7, 1]))),
        # Control frames the relay cannot take.
        "control-role-too-long": ("signal", "rejected:bad_control_frame", build_frame(Domain.SYSTEM, 0, 0, [(250, b"\x00\x00")], timestamp=1)),
        "control-unknown-tlv": ("signal", "rejected:filtered", build_frame(Domain.SYSTEM, 0, 0, [(9, b"")], timestamp=1)),
        "control-bad-checksum": ("market", "rejected:bad_checksum", unsealed(build_frame(Domain.SYSTEM, 0, 0, [(250, b"\x01")], timestamp=1))),
        "control-relay-info-sent": ("execution", "rejected:filtered", build_frame(Domain.SYSTEM, 0, 0, [(253, b"\x01market")], timestamp=1)),
        "control-recovery-short": ("execution", "rejected:bad_control_frame", build_frame(Domain.SYSTEM, 0, 0, [(110, b"\x01")], timestamp=1)),
        # Cut short: the connection ends inside a frame.
        "header-cut": ("signal", "incomplete", good("signal")[: HEADER_SIZE - 1]),
        "payload-cut": ("execution", "incomplete", good("execution", [(40, b"p" * 100)])[:-1]),
        # Not frames at all.
        "garbage-random": ("market", "closed:bad_magic", garbage),
        "garbage-zeros": ("signal", "closed:bad_magic", bytes(256)),
        "garbage-ones": ("execution", "closed:bad_magic", b"\xff" * 256),
        "http-request": ("market", "closed:bad_magic", b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n"),
    }


def main() -> None:
    manifest = {}
    for name, (domain, outcome, data) in cases().items():
        with open(os.path.join(HERE, f"{name}.bin"), "wb") as f:
            f.write(data)
        manifest[name] = {"domain": domain, "outcome": outcome}
    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
