"""Failures an operator must act on, as opposed to bugs.

A :class:`Fatal` ends a ``stream-rec`` command with its message on one line of
stderr and exit code 1 (2 is kept for usage and configuration errors), never a
stack trace: the message itself must say what happened and what to do.
"""

from __future__ import annotations


class Fatal(RuntimeError):
    """An expected failure that ends the command: one line on stderr, exit code 1."""


def describe(exc: BaseException | None) -> str:
    """``exc`` as one short phrase that names its class (Kafka errors already do)."""
    if exc is None:
        return "unknown error"
    name = type(exc).__name__
    text = str(exc).removesuffix(": None")
    if not text or text == "None":
        return name
    return text if name in text else f"{name}: {text}"
