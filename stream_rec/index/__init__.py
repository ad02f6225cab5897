"""FAISS index of item vectors, refreshed in place for the items that changed."""

from stream_rec.index.base import Options
from stream_rec.index.item_index import KINDS, ItemIndex, layout_for, set_search_threads

__all__ = ["KINDS", "ItemIndex", "Options", "layout_for", "set_search_threads"]
