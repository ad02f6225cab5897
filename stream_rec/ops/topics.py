"""``stream-rec topics``: create the topics stream-rec uses, and list what the cluster has.

Workers and producers create nothing unless ``kafka.create_topics`` is on; on a
cluster, topics are made once, here (or by the cluster's own tooling), with the
partition count and replication factor the deployment chose.
"""

from __future__ import annotations

import argparse

from stream_rec.ops.common import add_command, add_group, emit, settings_for, usage_error

EXAMPLE = ("stream-rec topics create --partitions 12 --replication-factor 3\n"
           "  stream-rec topics list")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec topics create|list``."""
    actions = add_group(sub, "topics", "create the clicks and dead-letter topics, list topics",
                        EXAMPLE)
    p = add_command(actions, "create",
                    "create the clicks topic and its dead-letter topic (or TOPIC…) where missing",
                    cmd_create,
                    "stream-rec topics create --partitions 12 --replication-factor 3")
    p.add_argument("names", nargs="*", metavar="TOPIC",
                   help="topics to create (default: kafka.topic and its dead-letter topic)")
    p.add_argument("--partitions", type=int,
                   help="partition count (default: kafka.partitions)")
    p.add_argument("--replication-factor", type=int,
                   help="replicas per partition, -1 for the broker's default "
                        "(default: kafka.replication_factor)")
    p = add_command(actions, "list", "topics with partition count and replication factor",
                    cmd_list, "stream-rec topics list --json")
    p.add_argument("names", nargs="*", metavar="TOPIC", help="only these topics")


def cmd_create(args: argparse.Namespace) -> int:
    from stream_rec.ingest.kafka import describe_topics, ensure_topics

    cfg = settings_for(args).kafka
    if args.partitions is not None and args.partitions < 1:
        raise usage_error("--partitions must be >= 1")
    if args.replication_factor is not None and args.replication_factor not in (-1,) \
            and args.replication_factor < 1:
        raise usage_error("--replication-factor must be >= 1, or -1 for the broker's default")
    names = args.names or [cfg.topic, cfg.dlq_topic]
    created = ensure_topics(cfg, names, partitions=args.partitions,
                            replication_factor=args.replication_factor)
    rows = describe_topics(cfg, names)
    lines = [f"{r['topic']}: {'created' if r['topic'] in created else 'exists'}, "
             f"{r['partitions']} partitions, replication {r['replication_factor']}"
             for r in rows]
    emit(args, {"created": created, "topics": rows}, lines)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from stream_rec.ingest.kafka import describe_topics

    cfg = settings_for(args).kafka
    rows = describe_topics(cfg, args.names or None)
    missing = [r["topic"] for r in rows if r["error_code"]]
    lines = [f"{r['topic']}: {r['partitions']} partitions, replication "
             f"{r['replication_factor']} (min in sync {r['in_sync_min']})"
             for r in rows if not r["error_code"]]
    lines += [f"{name}: not found" for name in missing]
    emit(args, {"topics": rows}, lines or ["no topics"])
    return 1 if missing else 0
