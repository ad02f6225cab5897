"""Operator subcommands: replay, snapshots, dead letters and status.

Each module exposes ``add_parser(subparsers)``; every command is safe to run
against a live system (see ``docs/OPERATIONS.md`` for what each guarantees).
"""
