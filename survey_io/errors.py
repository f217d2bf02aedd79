"""The one exception survey_io raises for bad input."""

from __future__ import annotations

from pathlib import Path


class SurveyError(Exception):
    """Bad survey input: names the file (or dataset) and what is wrong with it.

    ``str(err)`` is a single line, ``"<path>: <reason>"``, fit to print to a user
    as is; the CLI prints it and exits non-zero without a traceback.
    """

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)
