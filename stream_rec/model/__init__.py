"""Streaming recommendation model (contract: ``docs/MODEL_CONTRACT.md``)."""

from .config import ModelConfig
from .state import Changed, ModelState
from .streaming import StreamingModel, resolve_device

__all__ = ["Changed", "ModelConfig", "ModelState", "StreamingModel", "resolve_device"]
