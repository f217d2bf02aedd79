"""Errors the engine raises for bad input or bad state (as opposed to bugs)."""

from __future__ import annotations

from pathlib import Path


class CitygenError(Exception):
    """A user-facing error: one line naming the file (when there is one) and the problem."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)
