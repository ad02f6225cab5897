"""Publishing off the training path.

Serialising, checksumming and fsyncing a version runs on a background thread,
so a slow disk slows freshness, not ingest. The queue holds one job: while a
version is being written, the worker keeps learning and keeps accumulating
changed rows, so consecutive deltas are merged into the next one rather than
dropped. Completed versions are handed back to the polling thread, which alone
touches the consumer and commits their offsets.

Versions are numbered ``parent + 1``; the first one after a restore is one
past the newest version in the store. A transient store error (an I/O error,
a timeout) is retried with backoff; losing a version to another writer
(:class:`~stream_rec.snapshot.store.Fenced`) is not: the writer stops.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from stream_rec.faults import failpoint
from stream_rec.model import ModelState, StateDelta
from stream_rec.snapshot.store import Fenced, Manifest, SnapshotStore

log = logging.getLogger(__name__)


@dataclass
class PublishJob:
    """A consistent copy of what one version holds (taken on the training thread)."""

    offsets: dict[str, dict[int, int]]
    watermark: int | None
    events: int
    state: ModelState | None = None  # a full version
    delta: StateDelta | None = None  # or the changed rows over the previous version
    topic_ids: dict[str, str] = field(default_factory=dict)  # topic -> id its offsets are in


@dataclass(frozen=True)
class FullPolicy:
    """When the next version is written whole instead of as a delta."""

    max_chain: int = 50  # deltas since the last full version
    max_age_s: float = 300.0  # age of the last full version
    max_changed_fraction: float = 0.5  # a delta this large costs about a full version

    def wants_full(self, parent: Manifest | None, full_at: float, changed: int,
                   total: int) -> bool:
        if parent is None or parent.chain >= self.max_chain:
            return True
        if time.time() - full_at >= self.max_age_s:
            return True
        return total > 0 and changed / total > self.max_changed_fraction


class Publisher:
    """One background writer with a one-slot queue.

    ``retries`` transient failures of one version are retried, waiting
    ``backoff_s`` doubling each time, before the writer gives up.
    """

    def __init__(self, store: SnapshotStore, parent: Manifest | None, retries: int = 5,
                 backoff_s: float = 0.2) -> None:
        self.store = store
        self.parent = parent  # the newest version written (a delta's parent)
        self.retries = retries
        self.backoff_s = backoff_s
        self._next: int | None = None  # the next version number (decided at the first write)
        self.full_at = parent.created_at if parent is not None and parent.kind == "full" \
            else (time.time() if parent is not None else 0.0)
        self._jobs: queue.Queue[PublishJob | None] = queue.Queue(maxsize=1)
        self._done: queue.Queue[Manifest] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self.error: BaseException | None = None
        self.seconds_last = 0.0
        self.cpu_s = 0.0  # CPU time of the publisher thread (serialising, checksums, writes)
        self._thread = threading.Thread(target=self._run, name="snapshot-publisher",
                                        daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: PublishJob) -> None:
        """Queue ``job``; callers check :meth:`busy` first and merge while it is."""
        self.raise_if_failed()
        self._idle.clear()
        self._jobs.put(job)

    def completed(self) -> list[Manifest]:
        """Versions written since the last call, oldest first."""
        self.raise_if_failed()
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return self._idle.wait(timeout_s)

    def raise_if_failed(self) -> None:
        """Re-raise, on the caller's thread, what stopped the publisher (Fenced as itself)."""
        if isinstance(self.error, Fenced):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"publishing failed: {self.error}") from self.error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                self._write(job)
            except BaseException as exc:  # surfaced on the training thread
                log.exception("publishing a version failed")
                self.error = exc
                self._idle.set()
                return
            self.seconds_last = time.perf_counter() - t0
            self.cpu_s += time.thread_time() - c0
            self._idle.set()

    def _write(self, job: PublishJob) -> None:
        if self._next is None:
            self._next = max(self.store.next_version(),
                             self.parent.version + 1 if self.parent else 1)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                manifest = self._write_once(job, self._next)
                break
            except Fenced:
                raise
            except OSError as exc:
                if attempt == self.retries:
                    raise
                log.warning("writing version %d failed (%s): retrying in %.1f s", self._next,
                            exc, delay)
                time.sleep(delay)
                delay *= 2
        self._next = manifest.version + 1
        if manifest.kind == "full":
            self.full_at = manifest.created_at
        self.parent = manifest
        failpoint("after_publish")  # durable and LATEST moved; offsets not yet committed
        self._done.put(manifest)

    def _write_once(self, job: PublishJob, version: int) -> Manifest:
        if job.delta is not None:
            assert self.parent is not None
            return self.store.publish_delta(
                job.delta, parent=self.parent, offsets=job.offsets, watermark=job.watermark,
                events=job.events, version=version, topic_ids=job.topic_ids)
        assert job.state is not None
        return self.store.publish(
            job.state, offsets=job.offsets, watermark=job.watermark,
            parent=self.parent.version if self.parent else None, version=version,
            topic_ids=job.topic_ids)
