"""
The C{twisted-relay} command: watch a relay (tap), feed it (publish), read its
status endpoint (status), and read, check and republish its audit log (replay,
audit verify), without writing socket code.
"""

from __future__ import annotations

import argparse
import http
import io
import itertools
import json
import random
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NoReturn, cast

from . import __version__
from .audit import AuditDamage, LogFollower, LogReader, Record, audit_paths, verify
from .client import BlockingClient, PublishRefused, RelayClosed, RelayDead
from .control import BUSY, NO_AUDIT_LOG, NOT_SUBSCRIBED, REPLAYING
from .domains import UnknownDomain, find_domain
from .framing import Framer
from .interfaces import IRelayLogic
from .live import TapView
from .testing import synthetic, synthetic_kinds
from .validation import FramePolicy, refusal
from .wire import (
    HEADER_SIZE,
    MAGIC_BYTES,
    MAX_EXTENDED_TLV,
    TLV_NAMES,
    Domain,
    FrameError,
    FramingLost,
    Header,
    Source,
    tlv_spans,
    unpack_header,
)

EXAMPLES = {
    "tap": """examples:
  twisted-relay tap                                   # every frame on the market relay
  twisted-relay tap --domain execution --json         # orders and fills as JSON lines
  twisted-relay tap --source 1 --tlv-type 2 --count 10
  twisted-relay tap --stats                           # a live rate display
  twisted-relay tap unix:/tmp/x/e.sock --domain execution""",
    "publish": """examples:
  twisted-relay publish --count 100000                # trades and quotes, as fast as possible
  twisted-relay publish --domain execution --rate 1000 --count 5000
  twisted-relay publish tcp:10.0.0.5:7001 --source 2""",
    "status": """examples:
  twisted-relay status                                # http://127.0.0.1:9100
  twisted-relay status http://10.0.0.5:9100
  twisted-relay status --json | jq .reasons           # exit status 1 unless ok
  twisted-relay status --watch                        # a live view, like top""",
    "replay": """examples:
  twisted-relay replay /tmp/torq/audit/execution      # every audited frame, oldest first
  twisted-relay replay DIR --json --source 42 --from-sequence 1000 --to-sequence 1999
  twisted-relay replay DIR --since 2026-11-25T14:00:00 --until 2026-11-25T14:05:00
  twisted-relay replay DIR --since 1795615200000000000 --to unix:/tmp/x/e.sock""",
    "audit verify": "examples:\n  twisted-relay audit verify /tmp/torq/audit/execution",
}

#: Frames sent to the relay per write by publish and replay --to.
WRITE_BATCH = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Failed(Exception):
    """A one-line reason to stop with a non-zero exit."""


class Parser(argparse.ArgumentParser):
    """A bad argument is one line on stderr and a hint, not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def byte(text: str) -> int:
    """A source type or TLV type: an integer from 0 to 255."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not from 0 to 255")
    return value


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argument of C{kind} (int, float) that must be above 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not above 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def tlv(text: str) -> tuple[int, bytes]:
    """A TLV given as TYPE:HEX, for publish --tlv."""
    kind, _, value = text.partition(":")
    try:
        tlv_type, data = int(kind), bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE:HEX (e.g. 40:0a0b)") from None
    if not 1 <= tlv_type <= 254:
        raise argparse.ArgumentTypeError(f"TLV type {tlv_type} is not from 1 to 254")
    if len(data) > MAX_EXTENDED_TLV:
        raise argparse.ArgumentTypeError(
            f"a TLV value of {len(data):,} bytes is over the {MAX_EXTENDED_TLV:,}-byte limit"
        )
    return tlv_type, data


def _source_name(source: int) -> str:
    try:
        return f"{Source(source).name}({source})"
    except ValueError:
        return str(source)


def _tlv_types(frame: bytes) -> list[int] | None:
    try:
        return [tlv_type for tlv_type, _, _ in tlv_spans(frame, HEADER_SIZE, len(frame))]
    except FrameError:
        return None


def frame_fields(header: Header, frame: bytes) -> dict[str, object]:
    """The fields --json shows for a frame, its bytes in hex last (what publish --from takes)."""
    return {
        "timestamp_ns": header.timestamp,
        "relay_domain": header.relay_domain,
        "source": header.source,
        "sequence": header.sequence,
        "tlv_types": _tlv_types(frame),
        "size": len(frame),
        "frame": frame.hex(),
    }


def describe(header: Header, frame: bytes, as_json: bool) -> str:
    """One line for one frame."""
    if as_json:
        return json.dumps(frame_fields(header, frame))
    types = _tlv_types(frame)
    stamp = time.strftime("%H:%M:%S", time.gmtime(header.timestamp / 1e9))
    micros = header.timestamp // 1000 % 1_000_000
    names = "?" if types is None else " ".join(
        f"{TLV_NAMES.get(t, 'TLV')}({t})" for t in types
    )
    try:
        domain = Domain(header.relay_domain).name.lower()
    except ValueError:
        domain = str(header.relay_domain)
    return (
        f"{stamp}.{micros:06d}  {domain:<11} {_source_name(header.source):<26} "
        f"seq {header.sequence:<10} {names}  {len(frame)} B"
    )


class Unreachable(Failed):
    """The relay cannot be reached now: none there, or it went away (tap --follow tries again)."""


def connect(args: argparse.Namespace) -> BlockingClient:
    endpoint = args.endpoint or f"unix:{args.logic.socket_path}"
    try:
        return BlockingClient(endpoint)
    except FileNotFoundError:
        raise Unreachable(f"no relay at {endpoint}: the socket does not exist") from None
    except ConnectionRefusedError:
        raise Unreachable(f"no relay at {endpoint}: nothing is listening there") from None
    except PermissionError:
        raise Failed(f"permission denied connecting to {endpoint}") from None
    except ssl.SSLError as e:
        raise Failed(f"cannot connect to {endpoint}: {e}") from None
    except OSError as e:
        raise Unreachable(f"cannot connect to {endpoint}: {e}") from None
    except ValueError as e:
        raise Failed(f"cannot connect to {endpoint}: {e}") from None


def where(args: argparse.Namespace) -> str:
    """The relay the command talks to, as the user gave it (or the domain's socket)."""
    return args.endpoint or args.logic.socket_path


def introduce(relay: BlockingClient, args: argparse.Namespace, **declaration) -> None:
    """Declare the connection's role and check that the relay is of --domain."""
    try:
        domain, name = relay.introduce(**declaration)
    except TimeoutError:
        raise Failed(
            f"the relay at {where(args)} did not answer: is it a twisted_relay relay?"
        ) from None
    except ConnectionError as e:
        raise Unreachable(f"the relay at {where(args)} closed the connection: {e}") from None
    if domain != args.logic.domain:
        raise Failed(
            f"the relay at {where(args)} is the {name} relay (domain {domain}), not "
            f"{args.logic.name}: use --domain {name}"
        )


def tap(args: argparse.Namespace) -> int:
    """
    Print the frames the relay sends (or, with --stats, a line a second),
    then a summary; --follow reconnects and resumes where the tap left off.
    """
    view = TapView(time.monotonic(), gaps=not args.tlv_type)
    tapping = Tapping(args, view)
    interrupted = False
    try:
        tapping.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if tapping.relay is not None:  # it tapped: what it saw, however it ended
            tapping.close()
            summary = view.summary(time.monotonic())
            if args.stats:
                print(("\n" if tapping.live else "") + summary, flush=True)
            else:
                print(summary, file=sys.stderr)
    if interrupted:
        return 130
    if args.count and view.frames < args.count:
        raise Failed(
            f"{view.frames:,} of the {args.count:,} frames asked for arrived within "
            f"{args.timeout:g}s of quiet"
        )
    return 0


#: Seconds between the tap's attempts to reach a relay that went away
#: (--follow): the first wait, and the longest.
FOLLOW_BACKOFF = (0.1, 5.0)


class Tapping:
    """One run of the tap: its connections to the relay, and what it prints."""

    def __init__(self, args: argparse.Namespace, view: TapView) -> None:
        self.args = args
        self.view = view
        self.relay: BlockingClient | None = None
        #: The frames read while waiting for the relay's recovery answers.
        self.early: list[tuple[Header, bytes]] = []
        self.live = sys.stdout.isatty()

    def run(self) -> None:
        args, view = self.args, self.view
        self.relay = self._connect(dict(args.recover or ()))
        now = time.monotonic()
        next_tick, quiet_since = now + 1, now
        while not (args.count and view.frames >= args.count):
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = max(next_tick + 1, now + 0.5)
            if args.timeout and now - quiet_since >= args.timeout:
                return
            waits = [next_tick - now]
            if args.timeout:
                waits.append(quiet_since + args.timeout - now)
            batch = self._take(max(0.0, min(waits)))
            if batch:
                quiet_since = time.monotonic()
                self._show(batch)

    def _take(self, timeout: float) -> list[tuple[Header, bytes]]:
        """The next frames; a relay gone is an error, or with --follow, reconnected."""
        if self.early:
            batch, self.early = self.early, []
            return batch
        relay = self.relay
        assert relay is not None
        try:
            batch = relay.take(timeout)
            if batch or relay.connected:
                return batch
            gone = str(RelayClosed(relay.incoming.error))
        except (RelayDead, OSError) as e:
            gone = str(e)
        if not self.args.follow:
            raise Failed(
                f"lost the relay at {where(self.args)} after {self.view.frames:,} frames: {gone}"
            )
        print(f"lost the relay at {where(self.args)} ({gone}); reconnecting", file=sys.stderr)
        relay.close()
        self.view.reconnected()
        self.relay = self._reconnect()
        return []

    def _reconnect(self) -> BlockingClient:
        """Connect again, with backoff, asking for each source from the frame after the last seen."""
        delay, longest = FOLLOW_BACKOFF
        while True:
            wanted = {**dict(self.args.recover or ()), **{s: q + 1 for s, q in self.view.last.items()}}
            try:
                relay = self._connect(wanted)
            except Unreachable as e:
                print(f"{e}; again in {delay:.1f}s", file=sys.stderr)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, longest)
                continue
            print(f"reconnected to {where(self.args)}", file=sys.stderr)
            return relay

    def _connect(self, wanted: dict[int, int]) -> BlockingClient:
        """A connection to the relay, subscribed, with the replay of C{wanted} under way."""
        args = self.args
        relay = connect(args)
        try:
            introduce(relay, args, sources=args.source or None, tlv_types=args.tlv_type or None)
            relay.incoming.onAccount = self.view.accounted
            if wanted:
                self._recover(relay, wanted)
        except BaseException:
            relay.close()
            raise
        return relay

    def _recover(self, relay: BlockingClient, wanted: dict[int, int]) -> None:
        """Ask for the replay of C{wanted} and wait for the relay's answers."""
        answered = len(relay.incoming.answers)
        relay.recover(wanted)
        deadline = time.monotonic() + 10
        while len(relay.incoming.answers) < answered + len(wanted):
            if time.monotonic() > deadline or not relay.connected:
                raise Failed(f"the relay at {where(self.args)} did not answer the recovery request")
            self.early += relay.take(deadline - time.monotonic())
        for source, first, status in relay.incoming.answers[answered:]:
            if status == NO_AUDIT_LOG and not self.args.recover:
                print(
                    f"the relay at {where(self.args)} keeps no audit log: what source "
                    f"{source} published from sequence {first} on while the tap was away "
                    f"is lost to it (counted as gaps)",
                    file=sys.stderr,
                )
            elif status != REPLAYING:
                raise Failed(
                    f"the relay at {where(self.args)} cannot replay source {source} from "
                    f"sequence {first}: {RECOVERY_REFUSALS.get(status, f'status {status}')}"
                )

    def _show(self, batch: list[tuple[Header, bytes]]) -> None:
        args, view = self.args, self.view
        if args.count:
            batch = batch[: args.count - view.frames]
        view.take(batch, time.time_ns())
        if not args.stats:
            lines = [describe(header, frame, args.json) for header, frame in batch]
            if args.hex and not args.json:
                lines = [f"{line}  {frame[HEADER_SIZE:].hex()}" for line, (_, frame) in zip(lines, batch)]
            print("\n".join(lines), flush=True)

    def _tick(self, now: float) -> None:
        """A second is over: show its line (--stats), and ask the relay what it dropped to us."""
        line = self.view.tick(now)
        if self.args.stats:
            if self.live:
                sys.stdout.write("\r\x1b[K" + line)
                sys.stdout.flush()
            else:
                print(line, flush=True)
        relay = self.relay
        if relay is not None and relay.connected:
            try:
                relay.ask_account()
            except RelayClosed:
                pass  # found out at the next read

    def close(self) -> None:
        """The tap is over: the relay's last account of what it dropped to us, then hang up."""
        relay = self.relay
        if relay is None:
            return
        if relay.connected:
            try:
                self.view.accounted(relay.account(timeout=2))
            except (TimeoutError, OSError):
                pass  # the summary goes with the accounts that came
        relay.close()


#: Why a relay refuses a replay, by RecoveryResponse status.
RECOVERY_REFUSALS = {
    NO_AUDIT_LOG: "it keeps no audit log (the execution relay does, or --audit-dir)",
    BUSY: "a replay is already running for this connection",
    NOT_SUBSCRIBED: "this connection receives nothing (publish-only, or not allowed to subscribe)",
}


def source_sequence(text: str) -> tuple[int, int]:
    """SOURCE:SEQUENCE, for tap --recover."""
    source, _, sequence = text.partition(":")
    try:
        pair = byte(source), int(sequence)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SOURCE:SEQUENCE (a source 0-255, the first sequence wanted)"
        ) from None
    if pair[1] < 0:
        raise argparse.ArgumentTypeError(f"sequence {pair[1]} is below 0")
    return pair


def publish(args: argparse.Namespace) -> None:
    """Publish frames (built, or read from --from), each checked first as the relay would."""
    logic = args.logic
    policy = FramePolicy.for_logic(logic)
    given = [f"--{name}" for name in ("size", "tlv", "source") if getattr(args, name) is not None]
    if args.input is not None and given:
        raise Failed(f"--from sends the file's frames as they are: drop {' '.join(given)}")
    if args.size is not None and args.tlv is not None:
        raise Failed("--size and --tlv both say what a frame holds: give one of them")
    if args.input is not None:
        frames = checked(read_frames(args.input, policy.max_frame_size), logic, policy)
        if args.count:
            frames = itertools.islice(frames, args.count)
    else:
        try:
            built = synthetic(
                logic, args.count or 1000, args.source, size=args.size, tlvs=args.tlv
            )
        except ValueError as e:
            raise Failed(str(e)) from None
        # Built frames differ only in their sequence: the first of each kind is checked.
        kinds = len(synthetic_kinds(logic)[1])
        frames = itertools.chain(checked(itertools.islice(built, kinds), logic, policy), built)
    try:
        first = next(frames)  # a bad first frame fails before connecting
    except StopIteration:
        raise Failed(f"no frames in {args.input}") from None
    frames = itertools.chain([first], frames)
    with connect(args) as relay:
        introduce(relay, args, publish_only=True)
        started = time.monotonic()
        done = deliver(relay, frames, args)
        elapsed = time.monotonic() - started
        finish(
            relay,
            args,
            done,
            f"published {done.sent:,} {logic.name} frames ({done.size:,} bytes) in "
            f"{elapsed:.2f}s: {done.sent / elapsed if elapsed else 0:,.0f} frames/s",
        )


def checked(frames: Iterable[bytes], logic: IRelayLogic, policy: FramePolicy) -> Iterator[bytes]:
    """C{frames}, each checked as the relay would: the first it would refuse stops them."""
    for n, frame in enumerate(frames, 1):
        error = refusal(logic, policy, frame)
        if error is not None:
            raise Failed(
                f"frame {n:,} would be refused by the {logic.name} relay "
                f"({error.reason}): {error}"
            )
        yield frame


def read_frames(path: str, max_frame_size: int) -> Iterator[bytes]:
    """
    The frames of C{path} (C{-}: standard input): raw Protocol V2 frames
    back to back, or one frame per line, in hex or as the JSON objects of
    C{tap --json} and C{replay --json} (their C{frame} field).
    """
    try:
        stream = cast(io.BufferedReader, sys.stdin.buffer) if path == "-" else open(path, "rb")
    except OSError as e:
        raise Failed(f"cannot read {path}: {e.strerror}") from None
    with stream:
        if stream.peek(len(MAGIC_BYTES))[: len(MAGIC_BYTES)] == MAGIC_BYTES:
            yield from _raw_frames(stream, path, max_frame_size)
        else:
            yield from _line_frames(stream, path)


def _raw_frames(stream: io.BufferedReader, path: str, max_frame_size: int) -> Iterator[bytes]:
    framer = Framer(max_frame_size)
    try:
        while chunk := stream.read(256 * 1024):
            for buf, start, header in framer.frames(chunk):
                yield bytes(buf[start : start + HEADER_SIZE + header.payload_size])
    except FramingLost as e:
        raise Failed(f"{path} is not Protocol V2 frames at byte {e.offset:,}: {e}") from None
    if framer.buffered:
        raise Failed(f"{path} ends in the middle of a frame ({framer.buffered:,} bytes of it)")


def _line_frames(stream: io.BufferedReader, path: str) -> Iterator[bytes]:
    for number, line in enumerate(stream, 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        try:
            if text.startswith(b"{"):
                frame = bytes.fromhex(json.loads(text)["frame"])
            else:
                frame = bytes.fromhex(text.decode())
        except (ValueError, KeyError, TypeError):
            raise Failed(
                f"{path} line {number:,} is neither a frame in hex nor a JSON object with "
                f"its \"frame\" in hex (as tap --json prints)"
            ) from None
        yield frame


@dataclass
class Delivery:
    """What L{deliver} sent, and what stopped it early (a frame that may not be sent, Ctrl-C)."""

    sent: int = 0
    size: int = 0
    stopped: BaseException | None = None
    #: The frames of a write Ctrl-C cut short: some may have reached the relay.
    in_doubt: int = 0


class RelayGone(Failed):
    """The relay closed the connection while frames were being sent."""


def deliver(
    relay: BlockingClient,
    frames: Iterable[bytes],
    args: argparse.Namespace,
    batch_size: int = WRITE_BATCH,
) -> Delivery:
    """
    Send C{frames} in batches, at --rate if given, each frame once. A frame
    that may not be sent stops them after the frames before it are sent;
    Ctrl-C, or the relay closing the connection, stops them there and then.
    """
    rate = args.rate
    progress = sys.stderr.isatty()
    started = shown = time.monotonic()
    done = Delivery()
    batch: list[bytes] = []

    def send() -> None:
        data, count = b"".join(batch), len(batch)
        batch.clear()
        done.in_doubt = count
        try:
            relay.publish(data)
        except RelayClosed as closed:
            raise RelayGone(
                f"the relay at {where(args)} closed the connection after {done.sent:,} frames "
                f"were sent{_told(closed)}"
            ) from None
        done.in_doubt = 0
        done.sent += count
        done.size += len(data)

    try:
        try:
            for frame in frames:
                batch.append(frame)
                if len(batch) < batch_size and not rate:
                    continue
                send()
                if rate:
                    delay = started + done.sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if progress and time.monotonic() - shown > 0.2:
                    shown = time.monotonic()
                    sys.stderr.write(f"\r{done.sent:,} frames sent")
        except RelayGone:
            raise
        except Failed as refused:  # the frames before it go
            done.stopped = refused
        if batch:
            send()
    except (RelayGone, KeyboardInterrupt) as stopped:
        done.stopped = stopped
    if progress:
        sys.stderr.write(f"\r{done.sent:,} frames sent\n")
    return done


def finish(relay: BlockingClient, args: argparse.Namespace, done: Delivery, line: str) -> None:
    """End a publish: the relay's account of what C{done} sent, then what stopped it, if anything."""
    if isinstance(done.stopped, RelayGone):
        print(line)
        raise done.stopped
    if done.in_doubt:
        print(
            f"{line}; interrupted in the middle of writing {done.in_doubt:,} more frames, "
            f"some of which may have reached the relay: no account"
        )
        raise KeyboardInterrupt
    settle(relay, args, done.sent, line)
    if done.stopped is not None:
        raise done.stopped


def _told(closed: RelayClosed) -> str:
    return f": {closed.error[1]} ({closed.error[0]})" if closed.error else ""


def settle(relay: BlockingClient, args: argparse.Namespace, sent: int, done: str) -> None:
    """
    Ask the relay for its account of what was sent, and print C{done} with
    it: anything refused is a failure naming the reasons.
    """
    try:
        account = relay.flush(timeout=args.timeout)
    except PublishRefused as refused:
        print(f"{done}; the relay accepted {refused.account.accepted:,}")
        raise Failed(str(refused)) from None
    except RelayClosed as closed:
        print(done)
        raise Failed(
            f"the relay at {where(args)} closed the connection after {sent:,} frames were "
            f"sent{_told(closed)}"
        ) from None
    except TimeoutError:
        print(done)
        raise Failed(
            f"the relay at {where(args)} did not account for the {sent:,} frames sent "
            f"within {args.timeout:g}s"
        ) from None
    if account.accepted != sent:
        print(f"{done}; the relay accepted {account.accepted:,}")
        raise Failed(f"the relay accounts for {account.accepted:,} of the {sent:,} frames sent")
    print(f"{done}; the relay accepted all {account.accepted:,}")


def health_url(text: str) -> str:
    """The /health URL of the relay at C{text}: any path given, the relay's own."""
    base = text if "://" in text else f"http://{text}"
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/health"


def read_health(url: str, timeout: float) -> tuple[bytes, dict]:
    """The health document at C{url}, as sent and parsed; a relay not ok answers 503."""
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            if e.code != http.HTTPStatus.SERVICE_UNAVAILABLE:
                raise
            with e:
                body = e.read()
    except (urllib.error.URLError, OSError) as e:
        raise Failed(f"cannot read {url}: {getattr(e, 'reason', e)}") from None
    try:
        health = json.loads(body)
        known = isinstance(health["status"], str) and isinstance(health["totals"], dict)
    except (ValueError, KeyError, TypeError):
        known = False
    if not known:
        raise Failed(f"{url} is not a relay's status endpoint")
    return body, health


def verdict(url: str, health: dict) -> None:
    """Nothing if the relay is ok; otherwise the one line that makes the exit status 1."""
    if health["status"] != "ok":
        reasons = "; ".join(health.get("reasons") or ["no reason given"])
        raise Failed(f"the relay at {url} is {health['status']}: {reasons}")


def status(args: argparse.Namespace) -> int | None:
    url = health_url(args.url)
    for given, name in ((args.count, "--count"), (args.interval, "--interval")):
        if given is not None and not args.watch:
            print(
                f"twisted-relay status: {name} goes with --watch "
                "(see twisted-relay status --help)",
                file=sys.stderr,
            )
            return 2
    if args.watch:
        return watch(url, args)
    body, health = read_health(url, args.timeout)
    if args.json:
        sys.stdout.buffer.write(body)
    else:
        print("\n".join(status_lines(health)))
    verdict(url, health)
    return None


def status_lines(health: dict) -> list[str]:
    """The health document as the table C{status} prints."""
    totals = health["totals"]
    lines = [f"status     {health['status']}"]
    if health.get("reasons"):
        lines.append(f"reasons    {'; '.join(health['reasons'])}")
    lines += [
        f"domain     {health['domain']} ({health['relay_domain']}), delivery {health['delivery']}",
        f"version    {health['version']}, up {health['uptime_s']:.0f}s",
        f"listening  {', '.join(health['listening'])}",
        f"frames     {totals['frames_in']:,} in, {totals['frames_out']:,} out, "
        f"{totals['frames_dropped']:,} dropped, {totals['frames_lost']:,} lost",
        f"rejects    {totals['rejects'] or 'none'}; cut off {totals['cut_offs'] or 'none'}",
        f"pauses     {totals['publisher_pauses']}, {totals['publishers_paused_s']}s in all, "
        f"longest {totals['longest_pause_s']}s",
    ]
    bridge = health.get("nats")
    if bridge is not None:
        lines.append(
            f"nats       {'connected' if bridge['connected'] else 'NOT CONNECTED'} as "
            f"{bridge['origin']}: {bridge['frames_out']:,} frames out, "
            f"{bridge['frames_in']:,} in, {bridge['frames_dropped']:,} dropped, "
            f"{bridge['queued_bytes']:,} bytes queued"
        )
    audit = health.get("audit")
    if audit is not None:
        state = f"FAILING: {audit['failing']}" if audit["failing"] else "ok"
        lines.append(
            f"audit log  {audit['directory']}: {audit['records']:,} records, chain head "
            f"{audit['chain_head']}, fsync {audit['fsync']}, {state}"
        )
    lines += [
        "",
        f"{'id':>4}  {'role':<20} {'peer':<26} {'in':>12} {'out':>12} {'dropped':>9} {'buffered':>10}",
    ]
    for client in health["clients"]:
        lines.append(
            f"{client['id']:>4}  {client['role']:<20} {client['peer']:<26} "
            f"{client['frames_in']:>12,} {client['frames_out']:>12,} "
            f"{client['frames_dropped']:>9,} {client['buffered_bytes']:>10,}"
        )
    if health.get("clients_omitted"):
        lines.append(f"      and {health['clients_omitted']:,} less busy clients not listed")
    return lines


#: Clear the terminal and go home, before each view of C{status --watch} on a TTY.
CLEAR = "\x1b[H\x1b[2J"


def watch(url: str, args: argparse.Namespace) -> int | None:
    """
    C{status --watch}: the health document every --interval seconds as a
    live view, rates worked out from successive samples; Ctrl-C ends it (0).
    A bounded run (--count) exits as C{status} would for its last sample.
    """
    tty = sys.stdout.isatty()
    previous: dict | None = None
    shown = 0
    try:
        while True:
            started = time.monotonic()
            moment = time.strftime("%H:%M:%S")
            failure: Failed | None = None
            try:
                _, health = read_health(url, args.timeout)
                lines = watch_lines(health, previous, moment)
            except Failed as e:
                failure, health, lines = e, None, [f"{moment}  {e}"]
            previous = health
            if tty:
                size = shutil.get_terminal_size()
                lines = fit(lines, size.columns, size.lines - 1)
                sys.stdout.write(CLEAR)
            elif shown:
                lines.insert(0, "")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            shown += 1
            if args.count and shown >= args.count:
                break
            time.sleep(max(0.0, started + (args.interval or 1.0) - time.monotonic()))
    except KeyboardInterrupt:
        return 0
    if failure is not None:
        raise failure
    assert health is not None
    verdict(url, health)
    return None


def fit(lines: list[str], columns: int, rows: int) -> list[str]:
    """C{lines} cut to a terminal's width and height, saying how many rows did not fit."""
    if len(lines) > rows:
        lines = [*lines[: max(rows - 1, 0)], f"... {len(lines) - rows + 1} more rows"]
    return [line[:columns] for line in lines]


def watch_lines(health: dict, previous: dict | None, moment: str) -> list[str]:
    """
    One view of C{status --watch}: the relay, its rates and totals, and a row
    per client, busiest first. Rates are over the relay's own clock (its
    uptime) since C{previous}; none for the first sample or after a restart.
    """
    elapsed, then = None, None
    if previous is not None and health["uptime_s"] > previous["uptime_s"]:
        elapsed, then = health["uptime_s"] - previous["uptime_s"], previous
    before = {c["id"]: c for c in then["clients"]} if then else {}

    def rates(now: dict, was: dict | None) -> tuple[float, float, float, float] | None:
        if elapsed is None or was is None:
            return None
        return (
            (now["frames_in"] - was["frames_in"]) / elapsed,
            (now["bytes_in"] - was["bytes_in"]) / elapsed,
            (now["frames_out"] - was["frames_out"]) / elapsed,
            (now["bytes_out"] - was["bytes_out"]) / elapsed,
        )

    def shown(rate: tuple[float, float, float, float] | None) -> str:
        if rate is None:
            return f"{'-':>10} {'-':>8} {'-':>10} {'-':>8}"
        frames_in, bytes_in, frames_out, bytes_out = rate
        return f"{frames_in:>10,.0f} {bytes_in / 1e6:>8.2f} {frames_out:>10,.0f} {bytes_out / 1e6:>8.2f}"

    totals = health["totals"]
    clients = len(health["clients"]) + health.get("clients_omitted", 0)
    queued = sum(client["buffered_bytes"] for client in health["clients"])
    relay = f"relay     {clients:,} clients"
    if then is not None and elapsed is not None:
        frames_in, bytes_in, frames_out, bytes_out = rates(totals, then["totals"]) or (0, 0, 0, 0)
        drops = (totals["frames_dropped"] - then["totals"]["frames_dropped"]) / elapsed
        relay += (
            f"  in {frames_in:,.0f} frames/s {bytes_in / 1e6:.2f} MB/s  out {frames_out:,.0f} "
            f"frames/s {bytes_out / 1e6:.2f} MB/s  drops {drops:,.0f}/s"
        )
    lines = [
        f"{moment}  {health['domain']} relay (domain {health['relay_domain']})  "
        f"{health['status'].upper()}  up {health['uptime_s']:.0f}s  delivery "
        f"{health['delivery']}  version {health['version']}",
        *(f"  {reason}" for reason in health.get("reasons", ())),
        f"{relay}  queued {queued:,} B",
        f"totals    {totals['frames_in']:,} in, {totals['frames_out']:,} out, "
        f"{totals['frames_dropped']:,} dropped, {totals['frames_lost']:,} lost, "
        f"{sum(totals['rejects'].values()):,} rejected",
        "",
        f"{'id':>4}  {'role':<20} {'peer':<26} {'in/s':>10} {'MB/s':>8} {'out/s':>10} "
        f"{'MB/s':>8} {'queue B':>10} {'drops':>9}",
    ]
    rows = [(rates(client, before.get(client["id"])), client) for client in health["clients"]]
    rows.sort(key=lambda row: -(row[0][1] + row[0][3]) if row[0] else 0)
    for rate, client in rows:
        lines.append(
            f"{client['id']:>4}  {client['role']:<20.20} {client['peer']:<26.26} {shown(rate)} "
            f"{client['buffered_bytes']:>10,} {client['frames_dropped']:>9,}"
        )
    if health.get("clients_omitted"):
        lines.append(f"{'':>4}  and {health['clients_omitted']:,} less busy clients not listed")
    return lines


def time_ns(text: str) -> int:
    """
    Nanoseconds since the epoch from an integer of them or an ISO-8601 time
    (naive means UTC), for --since and --until.
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither nanoseconds since the epoch nor an ISO-8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def log_paths(directory: str, allow_empty: bool = False) -> list[str]:
    """The audit files of C{directory}, oldest first; at least one, unless C{allow_empty}."""
    try:
        paths = audit_paths(directory)
    except OSError as e:
        raise Failed(f"cannot read the audit directory {directory}: {e.strerror}") from None
    if not paths and not allow_empty:
        raise Failed(f"no audit files in {directory}")
    return paths


def kept(records: Iterator[Record], args: argparse.Namespace) -> Iterator[Record]:
    """The records that pass replay's filters."""
    sources = set(args.source or ())
    for record in records:
        if (
            (not sources or record.source in sources)
            and (args.from_sequence is None or record.sequence >= args.from_sequence)
            and (args.to_sequence is None or record.sequence <= args.to_sequence)
            and (args.since is None or record.received_ns >= args.since)
            and (args.until is None or record.received_ns <= args.until)
        ):
            yield record


def replay(args: argparse.Namespace) -> int:
    # The directory is checked now, before --to connects to a relay.
    log_paths(args.directory, allow_empty=args.follow)
    reader = LogFollower(args.directory) if args.follow else LogReader(audit_paths(args.directory))
    records = kept(iter(reader), args)
    try:
        if args.endpoint:
            republish(records, args)
        else:
            show(records, args)
    except KeyboardInterrupt:
        return 130  # --follow ends so; what was republished is accounted for
    return 0


def show(records: Iterator[Record], args: argparse.Namespace) -> None:
    """Print C{records}, one line each (--follow: each as it comes)."""
    try:
        for record in records:
            header = unpack_header(record.frame)
            if args.json:
                line = json.dumps({
                    "index": record.index, "received_ns": record.received_ns,
                    "client_id": record.client_id, **frame_fields(header, record.frame),
                })
            else:
                received = datetime.fromtimestamp(record.received_ns / 1e9, timezone.utc)
                line = (
                    f"#{record.index} received {received:%Y-%m-%dT%H:%M:%S.%fZ} client "
                    f"{record.client_id}  {describe(header, record.frame, False)}"
                )
            print(line, flush=args.follow)
    except AuditDamage as damage:
        sys.stdout.flush()  # the frames before the damage come before the error
        raise Failed(f"the audit log is damaged: {damage}") from None
    except OSError as e:  # its directory or a file gone (retired while followed, say)
        sys.stdout.flush()
        raise Failed(f"cannot read the audit log in {args.directory}: {e}") from None


def republish(records: Iterator[Record], args: argparse.Namespace) -> None:
    """
    Send the frames of C{records} to the relay at --to, byte for byte, in log
    order (--follow: each as it is logged, until Ctrl-C), then the relay's account.
    """
    with connect(args) as relay:
        introduce(relay, args, publish_only=True)
        done = deliver(relay, _logged_frames(records), args, 1 if args.follow else WRITE_BATCH)
        finish(
            relay,
            args,
            done,
            f"republished {done.sent:,} frames ({done.size:,} bytes) to {args.endpoint}",
        )


def _logged_frames(records: Iterator[Record]) -> Iterator[bytes]:
    """The frames of C{records}; damage to the log stops them, with the reason."""
    sent = 0
    try:
        for record in records:
            yield record.frame
            sent += 1
    except AuditDamage as damage:
        raise Failed(
            f"the audit log is damaged: {damage}; republished the {sent:,} frames before it"
        ) from None
    except OSError as e:
        raise Failed(
            f"cannot read the audit log: {e}; republished the {sent:,} frames before it"
        ) from None


def audit_verify(args: argparse.Namespace) -> int:
    """Check the whole log; exit status 1 if it is damaged, holes are only warned of."""
    log_paths(args.directory)  # a missing or empty directory fails, not "ok: 0 files"
    report = verify(args.directory)
    if report.damage is not None:
        print(f"damaged: {report.damage}")
        print(f"{report.records:,} records verified before the damage")
        if report.damage.torn:
            print("it is a torn last record (a write cut short): the relay cuts it off when it starts")
        return 1
    print(
        f"ok: {report.files:,} files, {report.records:,} records, "
        f"chain head 0x{report.head:08x}"
    )
    if report.sequence_holes:
        print(f"warning: {len(report.sequence_holes):,} sequence holes (not damage):")
        for source, before, after in report.sequence_holes:
            print(f"  source {source}: sequence jumps from {before} to {after}")
    return 0


def _command(commands, name: str, help: str, examples: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose description is its help, with its examples below."""
    return commands.add_parser(
        name, help=help, description=help, epilog=EXAMPLES.get(examples or name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="twisted-relay", description="Tools for Protocol V2 relays.")
    top.add_argument("--version", action="version", version=f"twisted-relay {__version__}")
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    def relay_command(name: str, help: str) -> argparse.ArgumentParser:
        command = _command(commands, name, help)
        command.add_argument(
            "endpoint", nargs="?",
            help="a socket path, or a Twisted client endpoint: unix:path=PATH, tcp:host=HOST:port=PORT, "
            "tls:host=HOST:port=PORT:trustRoots=DIR:certificate=FILE:privateKey=FILE (or "
            "unix:PATH, tcp:HOST:PORT, ssl:...) [default: the domain's socket]",
        )
        command.add_argument("--domain", default="market", help="relay domain [default: market]")
        return command

    tap_command = relay_command(
        "tap",
        "Print the frames a relay carries, or a live line a second (--stats); a summary at the "
        "end, on Ctrl-C too.",
    )
    tap_command.add_argument(
        "--json", action="store_true",
        help="one JSON object per frame, its bytes in hex (what publish --from takes)",
    )
    tap_command.add_argument("--hex", action="store_true", help="each frame's payload in hex after its line")
    tap_command.add_argument("--source", type=byte, action="append", help="only this source; repeatable")
    tap_command.add_argument("--tlv-type", type=byte, action="append", help="only frames with this TLV type; repeatable")
    tap_command.add_argument(
        "--count", type=positive(int), help="stop after this many frames; exit 1 if fewer arrive"
    )
    tap_command.add_argument(
        "--stats", action="store_true",
        help="a line a second instead of frames: rates, totals, frames the relay dropped to "
        "this tap, sequence gaps upstream, latency from the frames' timestamps",
    )
    tap_command.add_argument("--timeout", type=positive(float), help="stop after this many quiet seconds")
    tap_command.add_argument(
        "--recover", type=source_sequence, action="append", metavar="SOURCE:SEQ",
        help="start with source's frames from sequence SEQ on, from the relay's audit log, "
        "then live; repeatable",
    )
    tap_command.add_argument(
        "--follow", action="store_true",
        help="when the relay goes away, reconnect (with backoff) and resume from the frame "
        "after the last seen, where the relay keeps an audit log",
    )
    tap_command.set_defaults(run=tap)

    publish_command = relay_command(
        "publish",
        "Publish frames: built for the domain, or read from a file; each is checked as the "
        "relay would first, and the relay's account of them ends the command.",
    )
    publish_command.add_argument(
        "--count", type=positive(int),
        help="frames to send [default: 1000 built, or every frame of --from]",
    )
    publish_command.add_argument(
        "--rate", type=positive(float), help="frames per second [default: as fast as possible]"
    )
    publish_command.add_argument("--source", type=byte, help="source type [default: one of the domain]")
    publish_command.add_argument(
        "--size", type=positive(int), metavar="BYTES",
        help="make each frame this many bytes, header included, with one TLV of the domain",
    )
    publish_command.add_argument(
        "--tlv", type=tlv, action="append", metavar="TYPE:HEX",
        help="the frame's TLVs, in order, instead of the domain's; repeatable (e.g. 40:0a0b)",
    )
    publish_command.add_argument(
        "--from", dest="input", metavar="FILE",
        help="send the frames of FILE (- for standard input): raw frames, one frame in hex "
        "per line, or the JSON lines of tap --json",
    )
    publish_command.add_argument(
        "--timeout", type=positive(float), default=30.0,
        help="seconds to wait for the relay's account of the frames [default: 30]",
    )
    publish_command.set_defaults(run=publish)

    status_command = _command(
        commands,
        "status",
        "Show a relay's health endpoint; exit status 1 unless the relay is ok.",
    )
    status_command.add_argument(
        "url", nargs="?", default="http://127.0.0.1:9100",
        help="the relay's --http address, as http://HOST:PORT or HOST:PORT [default: http://127.0.0.1:9100]",
    )
    status_command.add_argument(
        "--timeout", type=positive(float), default=5.0, help="seconds to wait [default: 5]"
    )
    view = status_command.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="the health document as the relay sends it")
    view.add_argument(
        "--watch", action="store_true",
        help="a live view, refreshed every --interval: rates, queues and drops per client",
    )
    status_command.add_argument(
        "--interval", type=positive(float),
        help="with --watch: seconds between refreshes [default: 1]",
    )
    status_command.add_argument(
        "--count", type=positive(int),
        help="with --watch: stop after this many refreshes, exit status as for the last one",
    )
    status_command.set_defaults(run=status)

    replay_command = _command(
        commands, "replay", "Print the frames of an audit log, or republish them to a relay."
    )
    replay_command.add_argument("directory", metavar="DIR", help="the audit directory")
    replay_command.add_argument("--json", action="store_true", help="one JSON object per frame, frame bytes in hex")
    replay_command.add_argument(
        "--to", dest="endpoint", metavar="ENDPOINT",
        help="republish the frames to the relay at a socket path or endpoint (as tap and publish take it)",
    )
    replay_command.add_argument(
        "--domain", default="execution", help="domain of the --to relay [default: execution]"
    )
    replay_command.add_argument("--source", type=byte, action="append", metavar="N", help="only this source; repeatable")
    replay_command.add_argument("--from-sequence", type=int, metavar="N", help="only sequences from N on")
    replay_command.add_argument("--to-sequence", type=int, metavar="N", help="only sequences up to N")
    replay_command.add_argument(
        "--since", type=time_ns, metavar="TIME",
        help="only frames received from TIME on: nanoseconds since the epoch or ISO-8601 (naive: UTC)",
    )
    replay_command.add_argument("--until", type=time_ns, metavar="TIME", help="only frames received up to TIME")
    replay_command.add_argument(
        "--follow", action="store_true",
        help="go on with each frame logged after the end, across the log's files, until Ctrl-C",
    )
    replay_command.add_argument(
        "--rate", type=positive(float), help="with --to: frames per second [default: as fast as possible]"
    )
    replay_command.add_argument(
        "--timeout", type=positive(float), default=30.0,
        help="with --to: seconds to wait for the relay's account of the frames [default: 30]",
    )
    replay_command.set_defaults(run=replay)

    audit_command = _command(commands, "audit", "Work on an audit log.")
    audit_commands = audit_command.add_subparsers(dest="audit_command", required=True)
    verify_command = _command(
        audit_commands,
        "verify",
        "Check every record and file of an audit log; exit status 1 if damaged.",
        examples="audit verify",
    )
    verify_command.add_argument("directory", metavar="DIR", help="the audit directory")
    verify_command.set_defaults(run=audit_verify)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "domain"):
            args.logic = find_domain(args.domain)
        return args.run(args) or 0
    except (Failed, UnknownDomain) as e:
        print(f"twisted-relay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
