"""The worker wing: consume, learn, publish, commit.

- :mod:`.loop` -- the consume loop (:class:`Worker`, ``stream-rec worker``);
- :mod:`.source` -- where records come from: the live group or a bounded replay;
- :mod:`.checkpoint` -- offsets, watermark and changed rows, and the
  flush → publish → durable → commit sequence;
- :mod:`.health` -- broker liveness and the ``/healthz`` + ``/metrics`` endpoint.
"""

from .loop import Worker, run_worker
from .source import Bounds

__all__ = ["Bounds", "Worker", "run_worker"]
