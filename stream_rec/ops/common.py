"""Helpers shared by the operator subcommands: parsers, output, times, stores, reading ranges."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from kafka import TopicPartition

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def usage_error(message: str) -> UsageError:
    """The CLI's expected-failure exception (one line, exit 2)."""
    return UsageError(message)


def add_common_flags(p: argparse.ArgumentParser, server: bool = False) -> None:
    """``--bootstrap``, ``--topic``, ``--store`` (servers also ``--port``) and ``--log-level``."""
    g = p.add_argument_group("common")
    g.add_argument("--bootstrap", help="Kafka bootstrap servers (host:port[,host:port])")
    g.add_argument("--topic", help="clicks topic")
    g.add_argument("--store", help="snapshot store path or fsspec URL")
    if server:
        g.add_argument("--port", type=int, help="port to listen on")
    g.add_argument("--log-level", type=log_level, metavar="LEVEL",
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """``--log-level``'s value, upper-cased; anything else is an argument error."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


class Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr and exit code 2, like every expected failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def settings_for(args: argparse.Namespace) -> Any:
    """Settings from file and environment with the common flags applied on top."""
    from stream_rec.settings import load_settings

    return load_settings(**{
        "kafka.bootstrap": getattr(args, "bootstrap", None),
        "kafka.topic": getattr(args, "topic", None),
        "store.path": getattr(args, "store", None),
        "serve.port": getattr(args, "port", None),
        "log_level": getattr(args, "log_level", None),
    })


def add_command(sub: argparse._SubParsersAction, name: str, help_: str, func: Handler,
                example: str) -> argparse.ArgumentParser:
    """A (sub)command with the common flags, ``--json`` and an example in its help."""
    p = add_plain_command(sub, name, help_, func, example)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def add_plain_command(sub: argparse._SubParsersAction, name: str, help_: str, func: Handler,
                      example: str, server: bool = False) -> argparse.ArgumentParser:
    """A (sub)command with the common flags and an example in its help."""
    p = sub.add_parser(name, help=help_, description=help_,
                       epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, server)
    p.set_defaults(func=func)
    return p


def add_group(sub: argparse._SubParsersAction, name: str, help_: str,
              example: str) -> argparse._SubParsersAction:
    """A command with its own subcommands (``snapshots list``, ``dlq redrive``…)."""
    p = sub.add_parser(name, help=help_, description=help_,
                       epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return p.add_subparsers(dest="action", required=True, metavar="ACTION")


def emit(args: argparse.Namespace, data: Any, text: str | list[str]) -> None:
    """Print ``data`` as JSON with ``--json``, else the human-readable ``text``."""
    out = json.dumps(data, indent=2, sort_keys=True, default=str) \
        if getattr(args, "json", False) else text if isinstance(text, str) else "\n".join(text)
    try:
        print(out)
        sys.stdout.flush()
    except BrokenPipeError:  # piped into head & co: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def parse_time(text: str) -> int:
    """Epoch milliseconds from an integer (epoch ms) or an ISO-8601 timestamp (UTC if naive)."""
    raw = text.strip()
    if re.fullmatch(r"\d+", raw):
        return int(raw)
    try:
        dt = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise usage_error(f"not an ISO-8601 time or epoch milliseconds: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def parse_pairs(text: str, what: str) -> dict[int, int]:
    """``"0:120,1:80"`` → ``{0: 120, 1: 80}`` (partition:offset), or a usage error."""
    out: dict[int, int] = {}
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+):(\d+)", part)
        if not m:
            raise usage_error(f"{what}: expected PARTITION:OFFSET[,…] (e.g. 0:120,1:80), "
                              f"got {part!r}")
        p, o = int(m.group(1)), int(m.group(2))
        if p in out:
            raise usage_error(f"{what}: partition {p} given twice")
        out[p] = o
    return out


def age_s(created_at: float | None) -> float | None:
    return None if created_at is None else max(0.0, time.time() - created_at)


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def open_store(path: str, keep_versions: int = 20, must_exist: bool = True) -> Any:
    """A :class:`SnapshotStore`; with ``must_exist`` a missing store is an error, not created."""
    import fsspec

    from stream_rec.snapshot import SnapshotStore

    fs, root = fsspec.core.url_to_fs(path)
    if must_exist and not fs.exists(root.rstrip("/") + "/versions"):
        raise FileNotFoundError(f"no snapshot store at {path}")
    return SnapshotStore(path, keep_versions)


def topic_partitions(consumer: Any, topic: str) -> list[TopicPartition]:
    """The topic's partitions, or a usage error when the topic does not exist."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise usage_error(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(parts)]
