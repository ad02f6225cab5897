"""FAISS index of item vectors, refreshed in place for the items that changed."""

from stream_rec.index.flat import ItemIndex

__all__ = ["ItemIndex"]
