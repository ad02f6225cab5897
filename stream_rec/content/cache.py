"""Embedding cache keyed by the content hash of the text the encoder saw.

Two tiers: an LRU dict in memory (bounded by ``memory_items``) and, when a
directory is configured, a SQLite file on disk that outlives the process, so a
re-sent item, a replay of the catalogue topic or a restarted worker costs a
lookup instead of an encoder pass. Keys come from
:func:`stream_rec.content.encoder.content_key`, which includes the model name.

SQLite because it is in the standard library, commits atomically (a crash
leaves the file as of the last commit) and lets several processes read one
file; vectors are stored as raw float32 bytes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

import numpy as np

from .encoder import DIM

DB_NAME = "embeddings.sqlite"


class EmbeddingCache:
    """content key -> (dim,) float32 vector, in memory and optionally on disk.

    Thread-safe; a memory lookup never waits for disk I/O. Returned vectors are read-only views; callers copy before
    writing into them.
    """

    def __init__(self, directory: str | Path | None = None, *, memory_items: int = 100_000,
                 dim: int = DIM) -> None:
        self.dim = dim
        self.memory_items = memory_items
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()      # the memory tier; never held across disk I/O
        self._db_lock = threading.Lock()   # the SQLite connection
        self._db: sqlite3.Connection | None = None
        self.path: Path | None = None
        if directory:
            root = Path(directory)
            root.mkdir(parents=True, exist_ok=True)
            self.path = root / DB_NAME
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS embedding "
                             "(key TEXT PRIMARY KEY, dim INTEGER NOT NULL, vec BLOB NOT NULL)")
            self._db.commit()
        self.memory_hits = 0
        self.disk_hits = 0
        self.misses = 0

    # ---------------------------------------------------------------- reads
    def get_memory(self, key: str) -> np.ndarray | None:
        """The vector if it is in memory (no disk access: safe on a latency-bound thread)."""
        with self._lock:
            vec = self._mem.get(key)
            if vec is not None:
                self._mem.move_to_end(key)
                self.memory_hits += 1
            return vec

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors of the ``keys`` found in memory or on disk; the rest count as misses."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for k in keys:
                vec = self._mem.get(k)
                if vec is not None:
                    self._mem.move_to_end(k)
                    found[k] = vec
            self.memory_hits += len(found)
        rest = [k for k in keys if k not in found]
        from_disk: dict[str, np.ndarray] = {}
        if rest and self._db is not None:
            with self._db_lock:
                for i in range(0, len(rest), 500):  # SQLite's host-parameter limit
                    part = rest[i:i + 500]
                    rows = self._db.execute(
                        f"SELECT key, dim, vec FROM embedding WHERE key IN "
                        f"({','.join('?' * len(part))})", part).fetchall()
                    for key, dim, blob in rows:
                        if dim == self.dim:
                            from_disk[key] = np.frombuffer(blob, dtype=np.float32)
        with self._lock:
            for key, vec in from_disk.items():
                self._remember(key, vec)
            self.disk_hits += len(from_disk)
            self.misses += len(rest) - len(from_disk)
        found.update(from_disk)
        return found

    # --------------------------------------------------------------- writes
    def put_many(self, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Store ``vectors`` (key -> (dim,)) in memory and, in one transaction, on disk.

        Returns the stored read-only float32 copies.
        """
        stored: dict[str, np.ndarray] = {}
        for key, vec in vectors.items():
            v = np.array(vec, dtype=np.float32).reshape(-1)
            if v.shape != (self.dim,):
                raise ValueError(f"expected a ({self.dim},) vector for {key}, got {v.shape}")
            v.setflags(write=False)
            stored[key] = v
        with self._lock:
            for key, v in stored.items():
                self._remember(key, v)
        if stored and self._db is not None:
            rows = [(key, self.dim, v.tobytes()) for key, v in stored.items()]
            with self._db_lock, self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO embedding (key, dim, vec) VALUES (?, ?, ?)", rows)
        return stored

    def _remember(self, key: str, vec: np.ndarray) -> None:
        self._mem[key] = vec
        self._mem.move_to_end(key)
        while len(self._mem) > self.memory_items:
            self._mem.popitem(last=False)

    # ---------------------------------------------------------------- other
    def __len__(self) -> int:
        """Vectors held in memory."""
        return len(self._mem)

    def stats(self) -> dict[str, int]:
        return {"memory_hits": self.memory_hits, "disk_hits": self.disk_hits,
                "misses": self.misses, "in_memory": len(self._mem)}

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
