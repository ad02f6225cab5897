"""Asynchronous feature extraction: catalogue items in, content vectors out, off the training path.

The training loop hands catalogue items to :meth:`Featurizer.submit`, which
never waits for the encoder: a cached text is answered at once, any other item
joins a bounded pending map (keyed by item id, so a re-sent item replaces its
older text instead of queueing twice) and an encoder thread takes it from
there in batches. Between training steps the loop collects what is finished
with :meth:`Featurizer.take_ready`. When the pending map is full, ``submit``
refuses the item (counted as dropped) rather than block: the catalogue topic
can be re-read, a stalled training loop cannot be undone.

The encoder thread spends its time inside torch and the tokenizer, which
release the GIL, so the training thread keeps running; on a GPU host the
encoder runs there too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from stream_rec.faults import failpoint

from .cache import EmbeddingCache
from .encoder import DIM, MODEL_NAME, Encoder, SentenceEncoder, content_key, item_text

if TYPE_CHECKING:
    from stream_rec.settings import ContentSettings

log = logging.getLogger(__name__)


class Featurizer:
    """Encodes catalogue items in batches on its own thread; ``item_id -> (dim,) float32``.

    ``submit`` and ``take_ready`` may be called from any thread; they hold a
    lock only for dictionary operations, never across an encoder call.
    """

    def __init__(self, encoder: Encoder, cache: EmbeddingCache | None = None, *,
                 batch_size: int = 64, max_pending: int = 100_000,
                 attributes: Iterable[str] = ("year",), owns_cache: bool = False) -> None:
        self.encoder = encoder
        self.cache = cache if cache is not None else EmbeddingCache(dim=encoder.dim)
        self._owns_cache = owns_cache or cache is None   # closed by close()
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.attributes = tuple(attributes)
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (key, text)
        self._inflight: dict[str, str] = {}   # id -> key of the batch being encoded
        self._ready: dict[str, np.ndarray] = {}
        self._failed: list[str] = []          # ids whose batch failed, not yet taken
        self._closing = False
        self.submitted = 0
        self.cache_hits = 0      # answered at submit from memory, or by the thread from disk
        self.encoded = 0         # texts that went through the encoder
        self.dropped = 0         # refused because the pending map was full
        self.errors = 0          # items whose batch failed in the encoder
        self.batches = 0
        self.encode_s = 0.0      # seconds inside encoder calls
        self._thread = threading.Thread(target=self._run, name="featurizer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- input
    def submit(self, item: Mapping[str, Any]) -> bool:
        """Queue one catalogue item (``item_id``, ``title``, ``categories``, ``attributes``).

        Returns False only when the item was dropped because ``max_pending`` items
        are already waiting; True when its vector is ready or on its way. Never
        waits for the encoder.
        """
        item_id = str(item["item_id"])
        text = item_text(item, self.attributes)
        key = content_key(text, self.encoder.name)
        vec = self.cache.get_memory(key)
        with self._cond:
            self.submitted += 1
            if self._inflight.get(item_id, key) != key:
                del self._inflight[item_id]  # its batch holds an older text: do not publish it
            if vec is not None:
                self.cache_hits += 1
                self._pending.pop(item_id, None)
                self._ready[item_id] = vec
                return True
            if item_id in self._pending:
                self._pending[item_id] = (key, text)
                return True
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return False
            self._pending[item_id] = (key, text)
            self._cond.notify()
            return True

    def submit_many(self, items: Iterable[Mapping[str, Any]]) -> int:
        """``submit`` each item; returns how many were accepted."""
        return sum(self.submit(it) for it in items)

    # --------------------------------------------------------------- output
    def take_ready(self) -> dict[str, np.ndarray]:
        """Vectors finished since the previous call (item id -> read-only (dim,) float32)."""
        with self._cond:
            out, self._ready = self._ready, {}
        return out

    def take_failed(self) -> list[str]:
        """Ids whose batch failed in the encoder since the previous call (not retried:
        submit them again to retry)."""
        with self._cond:
            out, self._failed = self._failed, []
        return out

    def waiting(self, item_id: str) -> bool:
        """Is a text of ``item_id`` still waiting for, or inside, the encoder?"""
        with self._cond:
            return item_id in self._pending or item_id in self._inflight

    @property
    def pending(self) -> int:
        """Items waiting for, or inside, the encoder."""
        with self._cond:
            return len(self._pending) + len(self._inflight)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (for tools and tests, not for the training loop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"submitted": self.submitted, "cache_hits": self.cache_hits,
                    "encoded": self.encoded, "dropped": self.dropped, "errors": self.errors,
                    "batches": self.batches, "encode_s": self.encode_s,
                    "pending": len(self._pending) + len(self._inflight),
                    "ready": len(self._ready)}

    # --------------------------------------------------------------- thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch: list[tuple[str, str, str]] = []
                while self._pending and len(batch) < self.batch_size:
                    item_id, (key, text) = self._pending.popitem(last=False)
                    batch.append((item_id, key, text))
                    self._inflight[item_id] = key
            vectors = self._vectors(batch)
            with self._cond:
                for item_id, key, _ in batch:
                    if self._inflight.get(item_id) == key:
                        del self._inflight[item_id]
                        if key in vectors:
                            self._ready[item_id] = vectors[key]
                        else:
                            self._failed.append(item_id)
                self._cond.notify_all()

    def _vectors(self, batch: list[tuple[str, str, str]]) -> dict[str, np.ndarray]:
        """key -> vector for a batch: the disk cache first, the encoder for the rest."""
        texts = {key: text for _, key, text in batch}
        try:
            failpoint("featurize")  # a slow encoder, for tests: every batch waits here
            found = self.cache.get_many(texts)
            missing = [k for k in texts if k not in found]
            if missing:
                t0 = time.perf_counter()
                out = self.encoder.encode([texts[k] for k in missing])
                took = time.perf_counter() - t0
                if out.shape != (len(missing), self.encoder.dim):
                    raise ValueError(f"encoder returned {out.shape} for {len(missing)} texts")
                found.update(self.cache.put_many(dict(zip(missing, out))))
                with self._cond:
                    self.encoded += len(missing)
                    self.encode_s += took
            with self._cond:
                self.batches += 1
                # every item of the batch that did not cost an encoder pass of its own
                self.cache_hits += len(batch) - len(missing)
            return found
        except Exception:
            log.exception("featurizer: a batch of %d items failed in the encoder", len(batch))
            with self._cond:
                self.errors += len(batch)
            return {}

    # -------------------------------------------------------------- closing
    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the batch in hand; items still pending are abandoned."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._owns_cache and not self._thread.is_alive():
            self.cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyEncoder:
    """The sentence encoder, loaded by the first call that needs it.

    A featurizer encodes on its own thread, so the seconds of loading are
    spent there, never on the training thread; and a run whose texts are all
    in the cache (a restart, a replay) never loads it at all. Whether the
    optional dependencies are installed is checked at once, so a missing
    extra fails at start-up rather than in the encoder thread.
    """

    dim = DIM
    name = MODEL_NAME

    def __init__(self, model_dir: str | Path = "data/models", device: str = "auto",
                 batch_size: int = 64) -> None:
        from .encoder import wheel_model_zip

        wheel_model_zip()  # raises EncoderUnavailable naming the pip command
        self.model_dir, self.device, self.batch_size = model_dir, device, batch_size
        self._lock = threading.Lock()
        self._encoder: SentenceEncoder | None = None
        self.load_s = 0.0

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self._encoder is None:
                t0 = time.perf_counter()
                self._encoder = SentenceEncoder(self.model_dir, self.device, self.batch_size)
                self.load_s = time.perf_counter() - t0
                log.info("sentence encoder loaded in %.1f s", self.load_s)
        return self._encoder.encode(texts)


def featurizer_from_settings(cfg: ContentSettings) -> Featurizer:
    """The sentence encoder (loaded when first needed), the cache and the featurizer as
    ``Settings.content`` says."""
    encoder = LazyEncoder(cfg.model_dir, device=cfg.device, batch_size=cfg.batch_size)
    cache = EmbeddingCache(cfg.cache_dir or None, memory_items=cfg.memory_items,
                           dim=encoder.dim)
    return Featurizer(encoder, cache, batch_size=cfg.batch_size, max_pending=cfg.max_pending,
                      attributes=cfg.attributes, owns_cache=True)


def catalogue_vectors(items: Iterable[Mapping[str, Any]], cfg: ContentSettings
                      ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every item's text vector, waiting for the encoder (for tools and the evaluator).

    Through the same featurizer and cache as the worker, so a second run (or a
    worker after it) encodes nothing. Returns (item id -> (dim,) float32, the
    featurizer's counters).
    """
    with featurizer_from_settings(cfg) as fz:
        fz.submit_many(items)
        fz.wait_idle()
        out = fz.take_ready()
        if fz.take_failed():
            raise RuntimeError("the sentence encoder failed on part of the catalogue "
                               "(see the log)")
        return out, fz.stats()
