"""Served quality: HR@10 of what users get over HTTP while their own clicks stream in.

MovieLens-100K is replayed through Kafka at ``R`` events/s with a think time
``T``: a user's next click is sent no sooner than ``T`` after their previous
one, while other users' clicks go ahead meanwhile and each user's own order is
kept (the order and timing come from :func:`replay_schedule.think_time_schedule`;
its docstring describes the scheduler). The local broker, ``stream-rec worker``
and ``stream-rec serve`` run as separate processes.

Tested events are those of the prequential evaluation (``stream_rec/evaluation.py``)
over the *sent* order: every 25th event after a 10 % warm-up. Just before a
tested click is sent, its user asks ``GET /recommend/{user}?k=10``; a hit is
the clicked item among the ten items served (the server excludes the items it
knows the user has seen). In the same run, on the same sent order and tested
events, with no lag at all: the model in process (``run_eval``), and the
popularity and item co-occurrence baselines.

An answer *reflects* the user's previous click when what the answer names
covers that click's offset (from the broker's acknowledgement): the offsets of
its ``version`` (read from that version's manifest, the offsets ``/readyz``
shows), or offsets the answer states itself: a top-level ``offsets`` or an
``overlay`` object with ``offsets`` (``{partition: next offset}``, optionally
under the topic name; the manifest's convention). A server that follows the
topic between versions says how far it got that way and is measured with no
change here. As a cross-check, an answer counted as reflecting whose items
include the previous click's item is a contradiction (a server that knows the
click excludes the item).

Also reported: HR@10 by kind of answer (reflecting, not, a user's first click,
popularity fallback), how many events sent before each ask the answer did not
cover, the real gap between a user's previous click and the ask (never under
``T``: the sender waits for it in real time, not only on the schedule), the
request time, the scheduled and achieved send rates and how far the sender
fell behind its schedule.

Configurations (the issue's):

    a  T = 100 ms, R = 1 000 events/s, versions at the default publish interval, all events
    b  T = 1 s,    R = 300 events/s,   a version every 5 s (as on an object store), 150 s

    python scripts/bench_served_quality.py                 # a and b
    python scripts/bench_served_quality.py --config b
    python scripts/bench_served_quality.py --quick         # a, 15 s of sending: about a minute
    python scripts/bench_served_quality.py --set serve.poll_interval_ms=20   # any setting

``--rate``, ``--think-ms``, ``--seconds`` and ``--publish-interval-ms`` override
the configuration. Writes ``docs/results/bench_served_quality.json`` (configurations
run one at a time accumulate there, each with its command, time and load); the last
line printed is ``{"configs": {"a": {"served_hr@10": …, "model_hr@10": …, …}}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from benchlib import (
    RESULTS,
    Pipeline,
    VersionOffsets,
    answer_offsets,
    broker,
    covering,
    merged,
    percentiles,
    pipeline,
    settings_env,
    write_result,
)
from replay_schedule import Schedule, think_time_schedule

from stream_rec import datasets
from stream_rec.evaluation import run_eval
from stream_rec.events import encode_event
from stream_rec.ingest.kafka import make_producer
from stream_rec.snapshot import SnapshotStore

K = 10
WARMUP = 0.1
SAMPLE_EVERY = 25
CONFIGS: dict[str, dict[str, Any]] = {
    "a": {"think_s": 0.1, "rate": 1000.0, "publish_interval_ms": None, "seconds": None},
    "b": {"think_s": 1.0, "rate": 300.0, "publish_interval_ms": 5000, "seconds": 150.0},
}


@dataclass
class Ask:
    """One tested event: the answer its user got just before the click was sent."""

    i: int                        # position in the sent order
    t_ask: float                  # perf_counter, just before the request
    t_answer: float
    body: dict[str, Any] | None   # None: the request failed
    sources: dict[str, dict[int, int]] | None = None   # see benchlib.answer_offsets


def tested_positions(n: int) -> np.ndarray:
    """The prequential evaluation's tested events (seed 0) among ``n``: a boolean mask."""
    tested = np.zeros(n, dtype=bool)
    start = math.ceil(WARMUP * n)
    if start < n:
        tested[start::SAMPLE_EVERY] = True
    return tested


def previous_click(users: list[Any]) -> np.ndarray:
    """For each position, the position of the same user's previous event (-1 for none)."""
    last: dict[Any, int] = {}
    prev = np.full(len(users), -1, dtype=np.int64)
    for i, u in enumerate(users):
        prev[i] = last.get(u, -1)
        last[u] = i
    return prev


def replay(pipe: Pipeline, sent: list[dict[str, Any]], sched: Schedule, think_s: float
           ) -> dict[str, Any]:
    """Send ``sent`` on ``sched``'s timing, asking before each tested event; returns the raw log."""
    n = len(sent)
    tested = tested_positions(n)
    prev = previous_click([ev["user_id"] for ev in sent])
    needed = set(prev[tested][prev[tested] >= 0].tolist())   # clicks whose offsets we need
    acks: dict[int, tuple[int, int]] = {}
    send_t = np.full(n, np.nan)
    last_sent: dict[Any, float] = {}
    asks: list[Ask] = []
    versions = VersionOffsets(SnapshotStore(pipe.store_path), pipe.cfg.topic)
    producer = make_producer(pipe.cfg, linger_ms=1, acks=1)
    client = httpx.Client(base_url=pipe.base_url, timeout=5.0)

    def send(i: int) -> None:
        ev = sent[i]
        t = time.perf_counter()
        future = producer.send(pipe.cfg.topic, key=str(ev["user_id"]).encode(),
                               value=encode_event(ev))
        send_t[i] = last_sent[ev["user_id"]] = t
        if i in needed:
            future.add_callback(lambda meta, i=i: acks.__setitem__(i, (meta.partition,
                                                                       meta.offset)))

    # The first click goes alone: once it is served, the worker has joined its group.
    t_start = time.perf_counter()
    send(0)
    producer.flush()
    pipe.wait_ready()
    print(f"  first version served {time.perf_counter() - t_start:.1f} s after the first "
          f"click; sending (logs in {pipe.work})", flush=True)
    t0 = time.perf_counter() - float(sched.at_s[1] if n > 1 else 0.0)
    due_t = np.full(n, np.nan)
    for i in range(1, n):
        user = sent[i]["user_id"]
        due = t0 + float(sched.at_s[i])
        if user in last_sent:            # the think time holds in real time, not only on paper
            due = max(due, last_sent[user] + think_s)
        due_t[i] = due
        while (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        ask = None
        if tested[i]:
            t_ask = time.perf_counter()
            try:
                r = client.get(f"/recommend/{user}", params={"k": K})
                body = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                body = None
            ask = Ask(i, t_ask, time.perf_counter(), body)
        send(i)
        if ask is not None:              # after the click went: reading a manifest waits for nothing
            if ask.body is not None:
                ask.sources = answer_offsets(ask.body, versions, pipe.cfg.topic)
            asks.append(ask)
    producer.flush()
    producer.close()
    client.close()
    return {"asks": asks, "acks": acks, "send_t": send_t, "due_t": due_t, "prev": prev,
            "tested": tested}


def summarise(sent: list[dict[str, Any]], sched: Schedule, log: dict[str, Any],
              think_s: float, rate: float) -> dict[str, Any]:
    """Served HR@10, reflection and fallback fractions, think gaps and rates from the raw log."""
    prev, acks, send_t = log["prev"], log["acks"], log["send_t"]
    groups: dict[str, list[bool]] = {k: [] for k in
                                     ("all", "reflected", "not_reflected", "first_click",
                                      "fallback", "unresolved")}
    errors = contradictions = overlay_answers = 0
    reflected_by: dict[str, int] = {}
    gaps, latency, behind = [], [], []
    for a in log["asks"]:
        ev = sent[a.i]
        items = [str(x["item_id"]) for x in a.body["items"]] if a.body else []
        hit = str(ev["item_id"]) in items
        groups["all"].append(hit)
        latency.append(a.t_answer - a.t_ask)
        if a.body is None:
            errors += 1
            continue
        if a.sources:                   # the topic is fresh: a.i events were sent before this ask
            behind.append(a.i - sum(merged(a.sources).values()))
            overlay_answers += "overlay" in a.sources
        if a.body.get("fallback"):
            groups["fallback"].append(hit)
        p = int(prev[a.i])
        if p < 0:
            groups["first_click"].append(hit)
            continue
        gaps.append(a.t_ask - send_t[p])
        if not a.sources or p not in acks:
            groups["unresolved"].append(hit)
            continue
        part, off = acks[p]
        source = covering(a.sources, part, off)
        reflected = source is not None
        if source is not None:
            reflected_by[source] = reflected_by.get(source, 0) + 1
        groups["reflected" if reflected else "not_reflected"].append(hit)
        if reflected and str(sent[p]["item_id"]) in items:
            contradictions += 1

    def hr(xs: list[bool]) -> float | None:
        return round(float(np.mean(xs)), 4) if xs else None

    with_prev = len(groups["reflected"]) + len(groups["not_reflected"])
    n = len(sent)
    # Rates count from the second event: the first went alone, before the first version.
    sent_span = float(np.nanmax(send_t) - send_t[1]) if n > 2 else 0.0
    sched_span = float(sched.at_s[-1] - sched.at_s[1]) if n > 2 else 0.0
    lag = (send_t - log["due_t"])[1:]
    return {
        "events_sent": n,
        "tested": len(groups["all"]),
        "served_hr@10": hr(groups["all"]),
        "hr@10_by_answer": {k: hr(v) for k, v in groups.items() if k != "all"},
        "answers": {k: len(v) for k, v in groups.items()},
        "reflected_fraction": round(len(groups["reflected"]) / with_prev, 4) if with_prev else None,
        "fallback_fraction": round(len(groups["fallback"]) / max(len(groups["all"]), 1), 4),
        "errors": errors,
        "contradictions": contradictions,
        "overlay_answers": overlay_answers,
        "reflected_by": reflected_by,
        "events_behind": {k: round(v, 1) for k, v in percentiles(behind).items()},
        "ask_ms": {k: round(v * 1000, 2) for k, v in percentiles(latency).items()},
        "think_gap_s": {"min": round(float(np.min(gaps)), 4) if gaps else None,
                        **{k: round(v, 4) for k, v in percentiles(gaps).items()}},
        "scheduled_rate": round((n - 2) / sched_span, 1) if sched_span > 0 else None,
        "schedule_full_rate_until_s": round(sched.full_rate_until(rate), 2),
        "achieved_rate": round((n - 2) / sent_span, 1) if sent_span > 0 else None,
        "send_s": round(sent_span, 2),
        "sender_behind_s": {k: round(v, 4) for k, v in percentiles(lag[np.isfinite(lag)]).items()},
        "order_displacement": {k: round(v, 1) for k, v in sched.displacement().items()},
        "think_s": think_s,
    }


def in_process(sent: list[dict[str, Any]]) -> dict[str, Any]:
    """The model and the baselines on the same sent order and tested events, with no lag."""
    res = run_eval(sent, warmup=WARMUP, sample_every=SAMPLE_EVERY, device="cpu")
    return {"model_hr@10": round(res["model"]["hr@10"], 4),
            **{f"{name}_hr@10": round(m["hr@10"], 4) for name, m in res["baselines"].items()},
            "in_process_tested": res["n_tested"]}


def run_config(name: str, cfg: dict[str, Any], bootstrap: str, extra_env: dict[str, str],
               events: list[dict[str, Any]]) -> dict[str, Any]:
    sched = think_time_schedule([ev["user_id"] for ev in events], cfg["rate"],
                                cfg["think_s"]).until(cfg["seconds"])
    sent = [events[i] for i in sched.order.tolist()]
    env = dict(extra_env)
    if cfg["publish_interval_ms"] is not None:
        env["STREAM_REC_WORKER__PUBLISH_INTERVAL_MS"] = str(cfg["publish_interval_ms"])
    print(f"({name}) T = {cfg['think_s'] * 1000:.0f} ms, R = {cfg['rate']:.0f} events/s, "
          f"publish interval {cfg['publish_interval_ms'] or 'default'} ms: {len(sent)} events "
          f"scheduled over {sched.at_s[-1]:.0f} s…", flush=True)
    with pipeline(bootstrap, f"bench-served-{name}", env) as pipe:
        log = replay(pipe, sent, sched, cfg["think_s"])
    served = summarise(sent, sched, log, cfg["think_s"], cfg["rate"])
    print(f"({name}) sent in {served['send_s']:.0f} s; prequential run in process…", flush=True)
    t_eval = time.monotonic()
    ref = in_process(sent)
    print(f"({name}) in process: {time.monotonic() - t_eval:.0f} s", flush=True)
    if ref["in_process_tested"] != served["tested"]:
        raise SystemExit(f"tested sets differ: {ref['in_process_tested']} in process, "
                         f"{served['tested']} served")
    return {**served, **ref, "publish_interval_ms": cfg["publish_interval_ms"],
            "rate": cfg["rate"], "seconds_cap": cfg["seconds"], "settings": extra_env}


def table(name: str, r: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "   —  " if x is None else f"{x:.4f}"

    a, by = r["answers"], r["hr@10_by_answer"]
    with_prev = a["reflected"] + a["not_reflected"]
    rows = [
        ("served over HTTP", r["served_hr@10"], r["tested"], ""),
        ("  reflected the previous click", by["reflected"], a["reflected"],
         f"{a['reflected'] / max(with_prev, 1):.1%} of answers after a click"),
        ("  did not", by["not_reflected"], a["not_reflected"], ""),
        ("  user's first click", by["first_click"], a["first_click"], ""),
        ("  popularity fallback", by["fallback"], a["fallback"],
         f"{r['fallback_fraction']:.1%} of answers"),
        ("model in process, no lag", r["model_hr@10"], r["in_process_tested"], ""),
        ("popularity", r["popularity_hr@10"], r["in_process_tested"], ""),
        ("item co-occurrence", r["cooccurrence_hr@10"], r["in_process_tested"], ""),
    ]
    head = (f"({name}) T = {r['think_s'] * 1000:.0f} ms, R = {r['rate']:.0f} events/s (kept by "
            f"the schedule for its first {r['schedule_full_rate_until_s']:.0f} s), scheduled "
            f"{r['scheduled_rate']} events/s overall, achieved {r['achieved_rate']} events/s "
            f"({r['events_sent']} events in {r['send_s']} s), publish interval "
            f"{r['publish_interval_ms'] or 'default'} ms")
    lines = [head, f"{'answer / system':34s} {'HR@10':>7s} {'n':>6s}"]
    lines += [f"{label:34s} {f(v):>7s} {n:6d}  {note}".rstrip() for label, v, n, note in rows]
    eb = r["events_behind"]
    lines.append(f"events sent but not in what the answer covers, p50/p95/p99: {eb['p50']:.0f}"
                 f"/{eb['p95']:.0f}/{eb['p99']:.0f}; sender behind schedule p50/p99 "
                 f"{r['sender_behind_s']['p50']:.3f}/{r['sender_behind_s']['p99']:.3f} s")
    lines.append(f"think gap before asking p50 {r['think_gap_s']['p50']:.3f} s "
                 f"(min {r['think_gap_s']['min']}); ask p50/p99 {r['ask_ms']['p50']}/"
                 f"{r['ask_ms']['p99']} ms; errors {r['errors']}, unresolved "
                 f"{a['unresolved']}, contradictions {r['contradictions']}, overlay answers "
                 f"{r['overlay_answers']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["a", "b", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="configuration a, 15 s of sending")
    ap.add_argument("--rate", type=float, default=None, help="events/s")
    ap.add_argument("--think-ms", type=float, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="cap on the scheduled sending")
    ap.add_argument("--publish-interval-ms", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a setting for the worker and the server (repeatable)")
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    names = ["a"] if args.quick else (["a", "b"] if args.config == "all" else [args.config])
    extra_env = settings_env(args.set)
    data = datasets.load_ml100k()
    events = [{"user_id": int(r["user"]), "item_id": int(r["item"]), "ts": int(r["ts"]),
               "event": "click"} for r in data]
    results: dict[str, Any] = {}
    t_start = time.monotonic()
    with broker(args.bootstrap) as bootstrap:
        for name in names:
            cfg = dict(CONFIGS[name])
            if args.quick:
                cfg["seconds"] = 15.0
            for key, value in (("rate", args.rate), ("seconds", args.seconds),
                               ("publish_interval_ms", args.publish_interval_ms),
                               ("think_s", None if args.think_ms is None
                                else args.think_ms / 1000)):
                if value is not None:
                    cfg[key] = value
            load_before = os.getloadavg()[0]
            results[name] = run_config(name, cfg, bootstrap, extra_env, events)
            results[name].update(argv=sys.argv[1:], when=time.strftime("%Y-%m-%d %H:%M:%S"),
                                 load_avg_1m=[round(load_before, 2),
                                              round(os.getloadavg()[0], 2)])
            print(table(name, results[name]), flush=True)
    # Configurations run separately (a shared machine may be quiet for one at a time)
    # accumulate in one file; each carries its own command, time and load.
    out = "bench_served_quality_quick" if args.quick else "bench_served_quality"
    kept = {}
    if (RESULTS / f"{out}.json").exists():
        kept = json.loads((RESULTS / f"{out}.json").read_text()).get("configs", {})
    write_result(out, {"configs": {**kept, **results}})
    print(json.dumps({"configs": results, "wall_s": round(time.monotonic() - t_start, 1)}))


if __name__ == "__main__":
    main()
