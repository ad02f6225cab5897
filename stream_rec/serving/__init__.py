"""Serving readers: watch the snapshot store, hot-swap, answer top-K over HTTP."""
