"""Up-front checks shared by every command: value ranges, output locations, memory budgets,
and the one-line wording of operating-system errors.

They exist so that a bad option fails in the first milliseconds with one line naming the
option (``--steps``, ``field.log2_hashmap_size``) or the path, instead of after minutes of
work, with a traceback, or with half an output folder.  The caller names the option: this
module knows nothing of the command line.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import psutil

from .errors import CitygenError


@dataclass(frozen=True)
class Range:
    """An allowed interval of numbers (always finite: NaN and inf never pass)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        if lo and hi:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return lo or hi or "a finite number"

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else what it must be."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number {self.describe()}"
        if not math.isfinite(value):
            return f"must be a finite number {self.describe()}".rstrip()
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {self.describe()}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {self.describe()}"
        return None


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FINITE = Range()
UNIT = Range(0, 1)


def check_values(checks: Iterable[tuple[str, Any, Range]]) -> None:
    """Raise for the first ``(name, value, rule)`` whose value breaks its rule; None values
    (options not given) pass."""
    for name, value, rule in checks:
        if value is None:
            continue
        problem = rule.problem(value)
        if problem is not None:
            raise CitygenError(None, f"{name} {problem}, got {value!r}")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> bool:
    # access(2) also answers EROFS for read-only mounts, and truthfully for root.
    return os.access(folder, os.W_OK | os.X_OK)


def check_out_dir(path: str | Path, name: str) -> Path:
    """An output folder must be a folder this process can write into, or creatable: its
    nearest existing ancestor a writable folder (missing parents are made).  Nothing is
    created here."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise CitygenError(p, f"{name} is a file, not a folder")
        if not _writable(p):
            raise CitygenError(p, f"{name} is a folder this user cannot write into")
        return p
    base = _nearest_existing(p)
    if not base.is_dir():
        raise CitygenError(p, f"{name} cannot be created: {base} is a file, not a folder")
    if not _writable(base):
        raise CitygenError(p, f"{name} cannot be created: {base} is not writable")
    return p


def check_out_file(path: str | Path, name: str) -> Path:
    """An output file must not be a folder, and its folder must be writable or creatable."""
    p = Path(path)
    if p.is_dir():
        raise CitygenError(p, f"{name} is a folder, not a file")
    check_out_dir(p.parent if str(p.parent) else Path("."), name)
    return p


# -- memory --------------------------------------------------------------------------------------
#: Without an explicit budget, a command may plan to use this fraction of the RAM that is
#: available (free, reclaimable) when it starts: the rest is left to the OS and other jobs.
AVAILABLE_FRACTION = 0.75


@dataclass(frozen=True)
class MemoryBudget:
    bytes: float
    #: where it came from, for the error message.
    source: str


def available_memory_bytes() -> int:
    return int(psutil.virtual_memory().available)


def memory_budget(gb: float | None, option: str = "--memory-budget-gb") -> MemoryBudget:
    """``gb`` GB when given (checked positive), else :data:`AVAILABLE_FRACTION` of the RAM
    available now."""
    if gb is not None:
        check_values([(option, gb, POSITIVE)])
        return MemoryBudget(gb * 1e9, f"{option} {gb:g}")
    avail = available_memory_bytes()
    return MemoryBudget(AVAILABLE_FRACTION * avail, f"{AVAILABLE_FRACTION:.0%} of the {format_bytes(avail)} of RAM "
                                                    f"available now; set {option} to change it")


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def largest_fitting(need, lo: float, hi: float, budget: float, *, integer: bool = False, steps: int = 60) -> float | None:
    """The largest ``x`` in [lo, hi] with ``need(x) <= budget`` for a ``need`` that grows with
    ``x`` (bisection; on a log scale for positive reals), or None when even ``lo`` does not fit."""
    if need(lo) > budget:
        return None
    if need(hi) <= budget:
        return hi
    for _ in range(steps):
        if integer:
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
        else:
            mid = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def nice_up(x: float) -> str:
    """``x`` rounded up to 2 significant digits, as text (a value to suggest to a person)."""
    e = math.floor(math.log10(x)) - 1
    return f"{math.ceil(x / 10**e - 1e-9) * 10**e:.{max(0, -e)}f}"


def nice_down(x: float) -> str:
    """``x`` rounded down to 2 significant digits, as text."""
    e = math.floor(math.log10(x)) - 1
    return f"{math.floor(x / 10**e + 1e-9) * 10**e:.{max(0, -e)}f}"


# -- operating-system errors ---------------------------------------------------------------------
_OS_PROBLEMS = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_line(err: OSError) -> str:
    """One line for an OSError that names a path: ``PATH: problem`` (``-> PATH2`` for renames)."""
    problem = _OS_PROBLEMS.get(err.errno or -1) or err.strerror or type(err).__name__
    where = str(err.filename)
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    return f"{where}: {problem}"
