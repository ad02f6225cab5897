"""``stream-rec snapshots``: list, show, verify, diff, pin and unpin versions.

Everything here reads the store the way serving does (verifying checksums);
only ``pin``/``unpin`` write, and they move a single pointer file atomically:
serving's watcher follows the pin on its next poll, and retention never
deletes the pinned version.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from stream_rec.model import tables as T
from stream_rec.ops.common import (
    add_command,
    add_group,
    age_s,
    emit,
    fmt_age,
    open_store,
    settings_for,
    usage_error,
)

EXAMPLE = ("stream-rec snapshots list --store data/snapshots\n"
           "  stream-rec snapshots pin 41 --store data/snapshots")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``stream-rec snapshots list|show|verify|diff|pin|unpin``."""
    actions = add_group(sub, "snapshots", "inspect, verify, compare and pin snapshot versions",
                        EXAMPLE)
    add_command(actions, "list", "versions with kind, parent, offsets, watermark and age",
                cmd_list, "stream-rec snapshots list --store data/snapshots --json")
    p = add_command(actions, "show", "one version's manifest (default: latest)", cmd_show,
                    "stream-rec snapshots show 42 --store data/snapshots")
    p.add_argument("version", nargs="?", help="version number, 'latest' or 'pinned'")
    p = add_command(actions, "verify",
                    "verify every file's size and sha256 (all versions, or one); exit 1 if "
                    "any is corrupt", cmd_verify, "stream-rec snapshots verify --store data/snapshots")
    p.add_argument("version", nargs="?", help="version number (default: all)")
    p = add_command(actions, "diff",
                    "compare two versions: counts, offsets, watermark, users/items added, "
                    "item vectors changed", cmd_diff,
                    "stream-rec snapshots diff 40 42 --store data/snapshots")
    p.add_argument("old", help="version number, 'latest' or 'pinned'")
    p.add_argument("new", nargs="?", default="latest", help="version (default: latest)")
    p.add_argument("--atol", type=float, default=0.0,
                   help="a vector counts as changed when some entry moves by more than this")
    p = add_command(actions, "pin", "make serving answer from VERSION until unpinned", cmd_pin,
                    "stream-rec snapshots pin 41 --store data/snapshots")
    p.add_argument("version", help="version number to serve")
    add_command(actions, "unpin", "let serving follow the newest version again", cmd_unpin,
                "stream-rec snapshots unpin --store data/snapshots")


def _store(args: argparse.Namespace) -> Any:
    settings = settings_for(args)
    return open_store(settings.store.path, settings.store.keep_versions)


def _version(store: Any, text: str | None) -> int:
    """Resolve a version argument to a published version number, or a usage error."""
    versions = store.versions()
    if text in (None, "latest"):
        v = store.latest_version()
        if v is None:
            raise usage_error(f"{store.url} has no versions yet")
        return v
    if text == "pinned":
        v = store.pinned()
        if v is None:
            raise usage_error("no version is pinned")
        return v
    try:
        v = int(text.lstrip("v"))
    except ValueError:
        raise usage_error(f"not a version number: {text!r}") from None
    if v not in versions:
        have = f"{versions[0]}..{versions[-1]}" if versions else "none"
        raise usage_error(f"unknown version {v} in {store.url} (versions: {have})")
    return v


def _summary(store: Any, v: int, latest: int | None, pinned: int | None) -> dict[str, Any]:
    from stream_rec.snapshot import CorruptSnapshot

    row: dict[str, Any] = {"version": v, "latest": v == latest, "pinned": v == pinned}
    try:
        m = store.read_manifest(v)
    except CorruptSnapshot as exc:
        row.update(error=str(exc))
        return row
    row.update(kind=m.kind, parent=m.parent, offsets=m.offsets, watermark=m.watermark,
               counts=m.counts, created_at=m.created_at, age_s=round(age_s(m.created_at) or 0, 1),
               writer=m.writer)
    return row


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    latest, pinned = store.latest_version(), store.pinned()
    rows = [_summary(store, v, latest, pinned) for v in reversed(store.versions())]
    header = (f"{'version':>8} {'kind':5} {'parent':>7} {'events':>9} {'watermark':>14} "
              f"{'age':>6}  offsets  writer")
    lines = [header]
    for r in rows:
        flags = ("*" if r["latest"] else "") + ("P" if r["pinned"] else "")
        if "error" in r:
            lines.append(f"{r['version']:>7}{flags:1} CORRUPT: {r['error']}")
            continue
        offs = ";".join(f"{t}:" + ",".join(f"{p}:{o}" for p, o in sorted(parts.items()))
                        for t, parts in r["offsets"].items())
        lines.append(f"{r['version']:>7}{flags:1} {r['kind']:5} {r['parent']!s:>7} "
                     f"{r['counts'].get('events', 0):>9} {r['watermark']!s:>14} "
                     f"{fmt_age(r['age_s']):>6}  {offs}  {r['writer']}")
    lines.append(f"(* latest = {latest}, P pinned = {pinned})")
    emit(args, {"store": store.url, "latest": latest, "pinned": pinned, "versions": rows}, lines)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import orjson

    store = _store(args)
    v = _version(store, args.version)
    from stream_rec.snapshot import CorruptSnapshot

    try:
        m = store.read_manifest(v)
    except CorruptSnapshot as exc:
        raise usage_error(str(exc)) from None
    data = orjson.loads(m.to_json())
    data["age_s"] = round(age_s(m.created_at) or 0, 1)
    data["latest"] = v == store.latest_version()
    data["pinned"] = v == store.pinned()
    emit(args, data, orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
         .decode())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from stream_rec.snapshot import CorruptSnapshot

    store = _store(args)
    versions = [_version(store, args.version)] if args.version else store.versions()
    results = []
    for v in versions:
        try:
            store.load(v)
            results.append({"version": v, "ok": True})
        except (CorruptSnapshot, OSError, ValueError) as exc:
            results.append({"version": v, "ok": False, "error": str(exc)})
    bad = [r for r in results if not r["ok"]]
    lines = [f"v{r['version']}: " + ("ok" if r["ok"] else f"CORRUPT: {r['error']}")
             for r in results]
    lines.append(f"{len(results) - len(bad)} ok, {len(bad)} corrupt")
    emit(args, {"store": store.url, "results": results, "corrupt": len(bad)}, lines)
    return 1 if bad else 0


def diff_states(a: Any, b: Any, atol: float = 0.0) -> dict[str, Any]:
    """What changed from snapshot ``a`` to ``b``: ids added/removed and item vectors moved."""
    ua = {u for u in a.state.user_ids if u}
    ub = {u for u in b.state.user_ids if u}
    ia = {i: r for r, i in enumerate(a.state.item_ids) if i}
    ib = {i: r for r, i in enumerate(b.state.item_ids) if i}
    common = [i for i in ib if i in ia]
    changed, max_abs = 0, 0.0
    if common:
        # decoded: a version written in another vector dtype differs by its rounding only
        va = a.state.vectors(T.ITEM_VECTORS, np.array([ia[i] for i in common]))
        vb = b.state.vectors(T.ITEM_VECTORS, np.array([ib[i] for i in common]))
        delta = np.abs(vb.astype(np.float64) - va.astype(np.float64)).max(axis=1)
        changed = int((delta > atol).sum())
        max_abs = float(delta.max()) if len(delta) else 0.0
    ma, mb = a.manifest, b.manifest
    return {
        "old": ma.version, "new": mb.version,
        "counts": {k: {"old": ma.counts.get(k), "new": mb.counts.get(k)}
                   for k in sorted(set(ma.counts) | set(mb.counts))},
        "offsets": {"old": ma.offsets, "new": mb.offsets},
        "watermark": {"old": ma.watermark, "new": mb.watermark},
        "users_added": len(ub - ua), "users_removed": len(ua - ub),
        "items_added": len(ib.keys() - ia.keys()), "items_removed": len(ia.keys() - ib.keys()),
        "items_common": len(common), "item_vectors_changed": changed,
        "item_vectors_max_abs_change": max_abs,
    }


def cmd_diff(args: argparse.Namespace) -> int:
    from stream_rec.snapshot import CorruptSnapshot

    store = _store(args)
    va, vb = _version(store, args.old), _version(store, args.new)
    try:
        a, b = store.load(va), store.load(vb)
    except CorruptSnapshot as exc:
        raise usage_error(str(exc)) from None
    d = diff_states(a, b, args.atol)
    lines = [f"v{va} → v{vb}"]
    for k, c in d["counts"].items():
        lines.append(f"  {k}: {c['old']} → {c['new']}")
    lines.append(f"  watermark: {d['watermark']['old']} → {d['watermark']['new']}")
    lines.append(f"  offsets: {d['offsets']['old']} → {d['offsets']['new']}")
    lines.append(f"  users added {d['users_added']}, removed {d['users_removed']}; "
                 f"items added {d['items_added']}, removed {d['items_removed']}")
    lines.append(f"  item vectors changed: {d['item_vectors_changed']} of {d['items_common']} "
                 f"(max abs change {d['item_vectors_max_abs_change']:.6g})")
    emit(args, d, lines)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from stream_rec.snapshot import CorruptSnapshot

    store = _store(args)
    v = _version(store, args.version)
    try:
        store.pin(v)
    except CorruptSnapshot as exc:
        raise usage_error(f"refusing to pin version {v}: {exc}") from None
    emit(args, {"store": store.url, "pinned": v, "latest": store.latest_version()},
         f"serving pinned to version {v} (latest is {store.latest_version()}); "
         "'stream-rec snapshots unpin' to follow the newest again")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    store = _store(args)
    was = store.pinned()
    store.unpin()
    emit(args, {"store": store.url, "was_pinned": was, "pinned": None,
                "latest": store.latest_version()},
         f"unpinned (was {was}); serving follows the newest version "
         f"({store.latest_version()})")
    return 0
