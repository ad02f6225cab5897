"""Streaming recommendation model (contract: ``docs/MODEL_CONTRACT.md``).

``ModelConfig`` and the numpy side (``ModelState``, ``StateDelta``, table
names) import without torch, so settings, operator commands and serving do
not pay for it; ``StreamingModel`` (torch) is imported on first use.
"""

from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .delta import StateDelta, apply_delta, delta_from_state, merge_deltas
from .state import Changed, ModelState

if TYPE_CHECKING:
    from .streaming import StreamingModel, resolve_device

__all__ = ["Changed", "ModelConfig", "ModelState", "StateDelta", "StreamingModel",
           "apply_delta", "delta_from_state", "merge_deltas", "resolve_device"]


def __getattr__(name: str) -> Any:
    if name in ("StreamingModel", "resolve_device"):
        from . import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
