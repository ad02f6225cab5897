"""The trainer process of a pipelined worker: the model, the checkpoint and the publisher.

It restores the newest version, says so to the consumer process, then learns
the decoded batches the consumer puts on the ring and publishes versions
through the :class:`~stream_rec.worker.checkpoint.Checkpoint` (steps 1-5 of
its sequence; step 6, the offset commit, is the consumer's, on the
``durable`` message). It never touches the click topic; a model with content
reads the catalogue here (:class:`~stream_rec.worker.catalogue.Catalogue`,
its own consumer and dead-letter producer), since the vectors it announces
and the offsets versions record for it are this process's.

Messages to the consumer (``out`` queue): ``("restored", version, offsets, topic_id)``,
``("durable", version, offsets, counts, seconds)``, ``("rewound", generation,
offsets)``, ``("poisoned", since, upto, why)`` -- dead-letter those offsets --
``("stopped", version, offsets)``, ``("error", text)``. Control messages on
the ring, in order with the batches: ``("rewind", generation)``, ``("confirmed", topic_id)``
(the topic is still the one the batches came from), ``("reposition", offsets)``,
``("letters",)`` (the poisoned range is dead-lettered), ``("stop",)``.

It dies with the consumer process (``PR_SET_PDEATHSIG``): a worker whose
consumer was killed must not go on publishing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from typing import Any

from stream_rec.faults import failpoint
from stream_rec.model import StreamingModel
from stream_rec.model.quant import Encoding
from stream_rec.settings import Settings
from stream_rec.snapshot import Manifest, SnapshotStore
from stream_rec.snapshot.publisher import FullPolicy

from .catalogue import Catalogue
from .checkpoint import Checkpoint, NonFinite
from .ring import Columns, Ring

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent-alive check below remains
        pass


class Shared:
    """Values the consumer process updates and the trainer reads before publishing.

    ``last_poll`` (monotonic s): a publish after the consumer overran
    ``kafka.max_poll_interval_ms`` could apply events twice across the group;
    ``lease_renewed`` (monotonic s): the writer lease is the consumer process's.
    """

    def __init__(self, ctx: Any) -> None:
        self.last_poll = ctx.Value("d", time.monotonic(), lock=False)
        self.lease_renewed = ctx.Value("d", time.monotonic(), lock=False)


class _Letters:
    """The checkpoint flushes dead letters before publishing: here the consumer already did."""

    def flush(self) -> None:
        pass


class _ToConsumer:
    """The checkpoint's committer: the newest durable version goes to the consumer process,
    which commits its offsets (step 6 of the sequence, after ``before_commit``)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def commit(self, offsets: dict[int, int]) -> bool:
        m = self.trainer.last_durable
        assert m is not None
        publisher = self.trainer.checkpoint.publisher
        self.trainer.out.put(("durable", m.version, dict(offsets), dict(m.counts),
                              publisher.seconds_last if publisher else 0.0))
        return True


def trainer_main(settings: Settings, store: tuple[str, int, Encoding], writer: str,
                 ring_handle: Any, out: Any, shared: Shared, lease_ttl_s: float,
                 parent_pid: int) -> None:
    """Entry point of the trainer process (``multiprocessing`` spawn)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the consumer process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from stream_rec.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        url, keep, vector_dtype = store
        Trainer(settings, SnapshotStore(url, keep, writer, vector_dtype=vector_dtype),
                Ring.attach(ring_handle), out, shared, lease_ttl_s, parent_pid).run()
    except BaseException as exc:
        log.exception("the trainer failed")
        out.put(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


class Trainer:
    """The trainer side of the pipeline (one per worker, in its own process)."""

    def __init__(self, settings: Settings, store: SnapshotStore, ring: Ring, out: Any,
                 shared: Shared, lease_ttl_s: float, parent_pid: int) -> None:
        self.settings = settings
        self.wcfg = settings.worker
        self.ring = ring
        self.out = out
        self.shared = shared
        self.lease_ttl_s = lease_ttl_s
        self.parent_pid = parent_pid
        self.store = store
        self.checkpoint = Checkpoint(
            self.store, settings.kafka.topic,
            FullPolicy(max_chain=self.wcfg.full_every_versions, max_age_s=self.wcfg.full_every_s),
            on_durable=self._durable)
        self.model: StreamingModel | None = None
        self.generation = 0
        self.last_durable: Manifest | None = None
        self.committer = _ToConsumer(self)
        self.unconfirmed = 0      # batches applied since the consumer last confirmed the topic
        self.last_publish = 0.0
        self.overran = False
        self.awaiting_letters = False
        self.catalogue: Catalogue | None = None   # with content: the items topic

    def run(self) -> None:
        threads = self.wcfg.torch_threads or max(1, (os.cpu_count() or 2) - 1)
        import torch

        torch.set_num_threads(threads)
        self.model = self.checkpoint.restore(self.settings.model, self.wcfg.device)
        self.out.put(("restored", self.checkpoint.version, dict(self.checkpoint.offsets),
                      self.checkpoint.topic_id))
        publisher = self.checkpoint.start_publisher()
        if self.model.cfg.content_dim:
            self.catalogue = Catalogue(self.settings)
        started = self.last_publish = time.monotonic()
        cpu0 = time.process_time()  # what learning costs, without imports and the restore
        stopping = False
        try:
            while True:
                if os.getppid() != self.parent_pid:
                    raise SystemExit("the consumer process is gone")
                cols, msg = self.ring.get(0.02)
                if msg is not None:
                    stopping = self._control(msg) or stopping
                elif cols is not None:
                    self._learn(cols)
                if self.catalogue is not None:
                    self.catalogue.tick(self.checkpoint, self.model)
                self.checkpoint.commit_durable(self.committer)
                if stopping and cols is None and msg is None:  # the ring is drained
                    break
            publisher.wait_idle()
            if self._may_publish():
                self._publish()
                publisher.wait_idle()
            self.checkpoint.commit_durable(self.committer)
            stats = {"cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - started,
                     "publisher_cpu_s": publisher.cpu_s, "ring_empty_s": self.ring.waited_empty_s}
            self.out.put(("stopped", self.checkpoint.version, dict(self.checkpoint.offsets),
                          stats))
        finally:
            publisher.close()
            self.ring.close()
            if self.catalogue is not None:
                self.catalogue.close()

    # -- messages and batches ------------------------------------------------
    def _control(self, msg: tuple[Any, ...]) -> bool:
        """Handle a control message; whether it asks the trainer to stop."""
        kind = msg[0]
        if kind == "stop":
            return True
        if kind == "confirmed":
            # Every batch applied so far came from the topic the offsets refer to
            # (msg[1]: its id): a point where a version may be published.
            self.unconfirmed = 0
            self.checkpoint.topic_id = msg[1]
            due = time.monotonic() - self.last_publish >= self.wcfg.publish_interval_ms / 1000.0
            publisher = self.checkpoint.publisher
            if due and publisher is not None and not publisher.busy() and self._may_publish():
                self._publish()
                self.last_publish = time.monotonic()
        elif kind == "letters":
            self.awaiting_letters = False
        elif kind == "reposition":
            self.checkpoint.reposition(msg[1])
        elif kind == "rewind":
            self.generation = msg[1]
            self._rewind(force=False)
            self.out.put(("rewound", self.generation, dict(self.checkpoint.offsets)))
        return False

    def _learn(self, cols: Columns) -> None:
        if cols.generation < self.generation:
            return  # read before a rebalance: the consumer reads it again
        assert self.model is not None
        if len(cols):
            changed = self.model.learn(cols.user_ids, cols.item_ids, cols.ts, cols.weight)
            self.checkpoint.learned(changed, len(cols), cols.max_ts())
        failpoint("in_batch")  # learnt, offsets not yet advanced
        self.checkpoint.advance_to(cols.ends)
        self.unconfirmed += 1

    # -- publishing ------------------------------------------------------------
    def _may_publish(self) -> bool:
        now = time.monotonic()
        if not self.checkpoint.dirty or self.unconfirmed or self.awaiting_letters:
            return False
        if now - self.shared.lease_renewed.value >= self.lease_ttl_s:
            raise SystemExit("the writer lease was not renewed: not publishing")
        max_poll_s = self.settings.kafka.max_poll_interval_ms / 1000.0
        if now - self.shared.last_poll.value <= max_poll_s:
            self.overran = False
            return True
        if not self.overran:  # the consumer was held up (a full ring): it will be evicted
            log.warning("batch overran max_poll_interval_ms: not publishing before rejoining")
            self.overran = True
        return False

    def _publish(self) -> None:
        assert self.model is not None
        if self.catalogue is not None:
            self.catalogue.flush()
        try:
            self.checkpoint.publish(self.model, _Letters())
        except NonFinite as exc:
            since = self.checkpoint.published_offsets()
            upto = dict(self.checkpoint.offsets)
            log.error("training produced %s: returning to the newest version and having the "
                      "records since dead-lettered", exc)
            self._rewind(force=True)
            self.checkpoint.reposition(upto)  # past them: the next version records the skip
            self.awaiting_letters = True
            self.out.put(("poisoned", since, upto, str(exc)))

    def _rewind(self, force: bool) -> None:
        assert self.model is not None
        self.model = self.checkpoint.rewind(self.model, self.settings.model, self.wcfg.device,
                                            force=force)
        if self.catalogue is not None:
            self.catalogue.rewound(self.checkpoint)
        self.unconfirmed = 0

    def _durable(self, m: Manifest) -> None:
        self.last_durable = m
