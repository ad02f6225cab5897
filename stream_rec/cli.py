"""``stream-rec``: one command-line tool with a subcommand for every role.

Every subcommand accepts the common flags ``--bootstrap``, ``--topic`` and
``--store`` (servers also ``--port``), which override the settings from file
and environment. Expected failures (an unreachable broker, a bad argument)
end with a one-line message and a non-zero exit, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from stream_rec.ops.common import Parser, UsageError, add_plain_command, settings_for

log = logging.getLogger("stream_rec")

EXAMPLES = {
    "broker": "stream-rec broker --port 9092",
    "config": "STREAM_REC_KAFKA__TOPIC=clicks stream-rec config",
    "produce": "stream-rec produce --dataset ml-100k --rate 2000 --bootstrap 127.0.0.1:9092",
    "worker": "stream-rec worker --bootstrap 127.0.0.1:9092 --store data/snapshots",
    "serve": "stream-rec serve --store data/snapshots --port 8000",
    "demo": "stream-rec demo --rate 3000",
    "replay": "stream-rec replay --store data/replay --from-time 2026-06-01T00:00:00Z",
    "snapshots": "stream-rec snapshots list --store data/snapshots",
    "dlq": "stream-rec dlq list --reason 'missing field' --limit 20",
    "status": "stream-rec status --store data/snapshots --sample 5",
}


def _command(sub: argparse._SubParsersAction, name: str, help_: str,
             func: Callable[[argparse.Namespace], int], server: bool = False
             ) -> argparse.ArgumentParser:
    return add_plain_command(sub, name, help_, func, EXAMPLES[name], server)


# -- subcommands ------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from stream_rec.broker import LocalBroker

    broker = LocalBroker(port=args.port or 9092, host=args.host).start()
    print(f"bootstrap: {broker.bootstrap}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            if broker.proc is not None and broker.proc.poll() is not None:
                raise UsageError(f"broker exited with code {broker.proc.returncode}")
    finally:
        broker.stop()
    print("broker stopped", flush=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from stream_rec.settings import config_file

    settings = settings_for(args)
    data = {"config_file": str(config_file() or ""), **settings.masked()}
    print(json.dumps(data, indent=2))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from stream_rec.producer import open_source, produce

    settings = settings_for(args)
    if args.items:
        from stream_rec.producer import open_item_source

        topic = settings.kafka.items_topic
        n = produce(settings.kafka, open_item_source(args.dataset), limit=args.limit,
                    rate=args.rate, progress=None if not args.no_progress else False,
                    topic=topic, key_field="item_id")
        print(json.dumps({"produced": n, "topic": topic}))
        return 0
    events = open_source(args.dataset, seed=args.seed)
    n = produce(settings.kafka, events, limit=args.limit, rate=args.rate,
                progress=None if not args.no_progress else False)
    print(json.dumps({"produced": n, "topic": settings.kafka.topic}))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stream_rec import shutdown

    stop = shutdown.install()  # before the slow imports: a signal now is a request to stop
    from stream_rec.worker import run_worker

    settings = settings_for(args)
    if args.group:
        settings.kafka.group_id = args.group
    if args.device:
        settings.worker.device = args.device
    if args.procs is not None and args.procs < 1:
        raise UsageError("--procs: at least 1")
    return run_worker(settings, stop, procs=args.procs or 0, argv=args.argv)


def cmd_serve(args: argparse.Namespace) -> int:
    from stream_rec.serving.app import serve
    from stream_rec.snapshot import SnapshotStore

    settings = settings_for(args)
    if args.host:
        settings.serve.host = args.host
    serve(SnapshotStore(settings.store.path, settings.store.keep_versions), settings)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream_rec.demo import run_demo

    return run_demo(settings_for(args), rate=args.rate, limit=args.limit, watch=args.watch)


def _version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stream-rec")
    except PackageNotFoundError:
        from stream_rec import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stream-rec", description="Streaming recommendations from Kafka click events.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "broker", "run the local Kafka-compatible broker in the foreground",
                 cmd_broker, server=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")

    _command(sub, "config", "print the effective settings (secrets masked)", cmd_config)

    p = _command(sub, "produce", "push click events to the topic", cmd_produce)
    p.add_argument("--dataset", default="ml-100k",
                   help="ml-100k, synthetic, or a path to a .jsonl/.csv file")
    p.add_argument("--limit", type=int, default=None, help="stop after N events")
    p.add_argument("--rate", type=float, default=0.0, help="events/s (0 = as fast as possible)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic generator")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    p.add_argument("--items", action="store_true",
                   help="send the dataset's catalogue (item metadata) to kafka.items_topic")

    p = _command(sub, "worker", "consume, learn, publish snapshots, commit", cmd_worker)
    p.add_argument("--group", help="consumer group id")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--procs", type=int, metavar="N",
                   help="run a gang of N ranks on this host (torch's elastic launcher); "
                        "see docs/OPERATIONS.md")

    p = _command(sub, "serve", "answer top-K requests over HTTP from the newest snapshot",
                 cmd_serve, server=True)
    p.add_argument("--host", help="address to listen on")

    p = _command(sub, "demo", "local broker + worker + server, replaying MovieLens-100K",
                 cmd_demo, server=True)
    p.add_argument("--rate", type=float, default=4000.0, help="replay rate, events/s")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N events")
    p.add_argument("--watch", type=int, default=3, help="users whose answers are shown")

    from stream_rec.ops import dlq, evaluate, replay, snapshots, status, topics

    evaluate.add_parser(sub)
    replay.add_parser(sub)
    snapshots.add_parser(sub)
    dlq.add_parser(sub)
    status.add_parser(sub)
    topics.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a gang passes its ranks
    from stream_rec.logs import configure_logging

    configure_logging(getattr(args, "log_level", None))
    from stream_rec.errors import Fatal
    from stream_rec.ingest.kafka import BrokerUnavailable, TopicMissing

    try:
        return int(args.func(args) or 0)
    except (UsageError, BrokerUnavailable, TopicMissing, FileNotFoundError, ValueError) as exc:
        print(f"stream-rec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Fatal as exc:
        print(f"stream-rec {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
