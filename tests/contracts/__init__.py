"""Contract tests: one list of checks run over every implementation of a seam.

Store backends (local directory, fsspec ``memory://``), index kinds, and the
three scoring paths (in-memory model, snapshot state, HTTP answer) each pass
the same checks, so an alternative cannot quietly behave differently.
"""
