"""``stream-rec dlq list|redrive``: read dead letters and send chosen ones back to their topic.

Re-driving sends the value exactly as stored, so it helps when the cause lay
outside the message: a contract that was too strict and has since been
relaxed, a validator bug since fixed, a letter written by an older worker.
Letters whose value was cut when dead-lettered are never re-driven, and
letters that the current contract still rejects are skipped (they would only
come back), unless ``--force``.

Each re-driven copy carries the header ``redriven.from=<dlq partition>:<offset>``.
Before sending, ``redrive`` reads the source topic from the time of the
oldest selected letter (a copy is always produced after its letter) and skips
every letter whose copy is already there, so running it twice applies nothing
twice. The source topic is the single source of truth: no marker topic can
disagree with it after a crash halfway through a re-drive.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kafka import TopicPartition

from stream_rec.ingest.kafka import end_offsets, read_range
from stream_rec.ops.common import (
    add_command,
    add_group,
    emit,
    parse_pairs,
    settings_for,
    topic_partitions,
    usage_error,
)

log = logging.getLogger(__name__)

HEADER = "redriven.from"
CLOCK_SKEW_MS = 5 * 60 * 1000  # producer clocks may disagree this much
EXAMPLE = ("stream-rec dlq list --reason 'ts out of range' --limit 20\n"
           "  stream-rec dlq redrive --reason 'unknown event' --dry-run")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec dlq list|redrive``."""
    actions = add_group(sub, "dlq", "read dead letters and re-drive them after a fix", EXAMPLE)
    p = add_command(actions, "list", "dead letters with reason, origin and whether re-driven",
                    cmd_list, "stream-rec dlq list --reason 'missing field' --limit 20")
    p.add_argument("--limit", type=int, default=50, help="show at most N letters (0 = all)")
    p.add_argument("--reason", metavar="SUBSTR", help="only letters whose reason contains SUBSTR")
    p = add_command(
        actions, "redrive",
        "send selected dead letters back to their source topic, value as stored, once each. "
        "Use it after fixing a cause outside the message (a contract relaxed, a validator "
        "bug fixed); truncated letters and letters the current contract still rejects are "
        "skipped", cmd_redrive,
        "stream-rec dlq redrive --reason 'unknown event' --dry-run\n"
        "  stream-rec dlq redrive --origin 0:1200,3:88")
    p.add_argument("--reason", metavar="SUBSTR", help="letters whose reason contains SUBSTR")
    p.add_argument("--origin", metavar="P:O,…",
                   help="letters from these source partition:offset positions")
    p.add_argument("--all", action="store_true", help="every letter (with no other selector)")
    p.add_argument("--dry-run", action="store_true", help="say what would be sent, send nothing")
    p.add_argument("--force", action="store_true",
                   help="also send letters the current contract still rejects")


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    for k, v in headers or []:
        if k == name:
            return v.decode("utf-8", "replace") if v is not None else ""
    return None


def _letter(rec: Any) -> dict[str, Any]:
    h = rec.headers
    part, off = _header(h, "origin.partition"), _header(h, "origin.offset")
    value = rec.value
    return {
        "dlq_partition": rec.partition, "dlq_offset": rec.offset, "timestamp": rec.timestamp,
        "key": None if rec.key is None else rec.key.decode("utf-8", "replace"),
        "reason": _header(h, "error.reason") or "",
        "origin": {"topic": _header(h, "origin.topic"),
                   "partition": int(part) if part and part.isdigit() else None,
                   "offset": int(off) if off and off.isdigit() else None},
        "truncated": _header(h, "value.truncated") == "true",
        "value_bytes": None if value is None else len(value),
        "value_preview": None if value is None else value[:200].decode("utf-8", "replace"),
        "_key": rec.key, "_value": value,
    }


def read_letters(cfg: Any, reason: str | None = None) -> list[dict[str, Any]]:
    """Every dead letter up to the DLQ's end offsets now (optionally filtered by reason)."""
    from stream_rec.ingest.kafka import make_consumer

    consumer = make_consumer(cfg, None)
    try:
        if not consumer.partitions_for_topic(cfg.dlq_topic):
            return []  # the worker creates it on start: no topic, no letters
        tps = topic_partitions(consumer, cfg.dlq_topic)
        begin, end = consumer.beginning_offsets(tps), end_offsets(consumer, tps)
        letters = [_letter(r) for r in read_range(consumer, begin, end)]
    finally:
        consumer.close()
    if reason:
        letters = [x for x in letters if reason in x["reason"]]
    return sorted(letters, key=lambda x: (x["timestamp"], x["dlq_partition"], x["dlq_offset"]))


def redriven_marks(cfg: Any, topics: set[str], since_ms: int) -> set[str]:
    """``redriven.from`` values found in ``topics`` on records at/after ``since_ms``."""
    from stream_rec.ingest.kafka import make_consumer

    marks: set[str] = set()
    consumer = make_consumer(cfg, None)
    try:
        for topic in sorted(topics):
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                continue
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            end = end_offsets(consumer, tps)
            found = consumer.offsets_for_times({tp: max(0, since_ms) for tp in tps})
            start = {tp: (found[tp].offset if found.get(tp) is not None else end[tp])
                     for tp in tps}
            for rec in read_range(consumer, start, end):
                mark = _header(rec.headers, HEADER)
                if mark is not None:
                    marks.add(mark)
    finally:
        consumer.close()
    return marks


def _public(letter: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in letter.items() if not k.startswith("_")}


def _mark(letter: dict[str, Any]) -> str:
    return f"{letter['dlq_partition']}:{letter['dlq_offset']}"


def _with_redriven(cfg: Any, letters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if letters:
        topics = {x["origin"]["topic"] or cfg.topic for x in letters}
        marks = redriven_marks(cfg, topics, min(x["timestamp"] for x in letters) - CLOCK_SKEW_MS)
        for x in letters:
            x["redriven"] = _mark(x) in marks
    return letters


def cmd_list(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise usage_error("--limit must be >= 0")
    cfg = settings_for(args).kafka
    letters = read_letters(cfg, args.reason)
    total = len(letters)
    shown = letters[:args.limit] if args.limit else letters
    _with_redriven(cfg, shown)
    lines = []
    for x in shown:
        o = x["origin"]
        flags = (" [truncated]" if x["truncated"] else "") + (" [re-driven]" if x["redriven"]
                                                              else "")
        lines.append(f"{cfg.dlq_topic}/{_mark(x)} ← {o['topic']}/{o['partition']}:{o['offset']} "
                     f"key={x['key']!r}: {x['reason']}{flags}")
        lines.append(f"    {x['value_preview']!r}")
    lines.append(f"{len(shown)} of {total} letters shown")
    emit(args, {"topic": cfg.dlq_topic, "total": total, "letters": [_public(x) for x in shown]},
         lines)
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    from stream_rec.events import Contract, InvalidEvent, parse_event
    from stream_rec.ingest.kafka import make_producer

    origins = parse_pairs(args.origin, "--origin") if args.origin else None
    if not (args.reason or origins or args.all):
        raise usage_error("choose letters with --reason SUBSTR, --origin P:O,… or --all")
    if args.all and (args.reason or origins):
        raise usage_error("--all cannot be combined with --reason or --origin")
    settings = settings_for(args)
    cfg, contract = settings.kafka, Contract(settings.events)
    letters = read_letters(cfg, args.reason)
    if origins is not None:
        letters = [x for x in letters
                   if origins.get(x["origin"]["partition"], -1) == x["origin"]["offset"]]
    _with_redriven(cfg, letters)
    send, skipped = [], []
    for x in letters:
        why = None
        if x["redriven"]:
            why = "already re-driven"
        elif x["truncated"]:
            why = "value was truncated when dead-lettered: cannot be re-driven"
        elif not args.force:
            try:
                parse_event(x["_value"], contract)
            except InvalidEvent as exc:
                why = f"still invalid under the current contract: {exc}"
        if why:
            skipped.append({**_public(x), "skipped": why})
        else:
            send.append(x)
    sent: list[dict[str, Any]] = []
    if send and not args.dry_run:
        producer = make_producer(cfg)
        try:
            futures = []
            for x in send:
                topic = x["origin"]["topic"] or cfg.topic
                headers = [(HEADER, _mark(x).encode())]
                futures.append((x, topic, producer.send(topic, key=x["_key"], value=x["_value"],
                                                        headers=headers)))
            producer.flush()
            for x, topic, fut in futures:
                md = fut.get(timeout=30)
                sent.append({**_public(x), "to": {"topic": topic, "partition": md.partition,
                                                   "offset": md.offset}})
        finally:
            producer.close(timeout=10)
    already = sum(1 for s in skipped if s["skipped"] == "already re-driven")
    result = {"selected": len(letters), "redriven": len(sent), "dry_run": args.dry_run,
              "would_redrive": len(send) if args.dry_run else None,
              "already_redriven": already, "skipped": skipped, "sent": sent}
    lines = [f"  skipped {s['dlq_partition']}:{s['dlq_offset']}: {s['skipped']}"
             for s in skipped if s["skipped"] != "already re-driven"]
    verb = f"would re-drive {len(send)}" if args.dry_run else f"re-drove {len(sent)}"
    lines.insert(0, f"{len(letters)} letters selected: {verb}, {already} already re-driven, "
                    f"{len(skipped) - already} skipped")
    emit(args, result, lines)
    return 0
