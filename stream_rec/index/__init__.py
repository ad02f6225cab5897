"""FAISS index of item vectors, refreshed in place for the items that changed."""

from stream_rec.index.item_index import KINDS, ItemIndex, set_search_threads

__all__ = ["KINDS", "ItemIndex", "set_search_threads"]
