"""The worker wing: consume, learn, publish, commit.

- :mod:`.loop` -- the consume loop (:class:`Worker`), in one process;
- :mod:`.pipeline`, :mod:`.trainer`, :mod:`.ring` -- the same as two processes (the
  default): a consumer and a trainer joined by a shared-memory ring;
- :mod:`.run` -- ``stream-rec worker``;
- :mod:`.source` -- where records come from: the live group or a bounded replay;
- :mod:`.checkpoint` -- offsets, watermark and changed rows, and the
  flush → publish → durable → commit sequence;
- :mod:`.health` -- broker liveness and the ``/healthz`` + ``/metrics`` endpoint.
"""

from .loop import Worker
from .pipeline import PipelineWorker, make_worker
from .run import run_worker
from .source import Bounds

__all__ = ["Bounds", "PipelineWorker", "Worker", "make_worker", "run_worker"]
