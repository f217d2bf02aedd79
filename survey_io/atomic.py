"""Atomic file writes: write a sibling temp file, fsync, rename over the target.

A reader never sees a half-written file, and a crash leaves the previous version intact.
A process killed mid-write (SIGKILL, power loss) leaves its temp file behind: it is named
``.<target name>.tmp-<writer pid>-<8 random chars><target suffixes>`` so that
:func:`temp_files` can find it and tell which process wrote it; whoever owns the folder
removes the ones no live writer owns (see ``citygen.distributed.lease``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

#: between the target's name and the writer's pid in a temp file's name.
TEMP_MARK = ".tmp-"
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[a-z0-9_]{8}(?P<suffix>\..*)?$")
# The naming before the pid was added (``.<name>.<8 random chars><suffixes>``).
_LEGACY_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\..+)$")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed onto ``path``.

    For writers that want a file name (rasterio, PIL, laspy): they write to the yielded
    path, and only a clean exit of the ``with`` block publishes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-",
                               suffix=suffix or "".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; published files get the usual umask-derived mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def scratch_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to ``path`` that is always removed at the end: a staging file
    (for instance the tiled GeoTIFF a Cloud Optimized GeoTIFF is copied from).  It is named
    like :func:`atomic_path`'s temp files, so :func:`temp_files` finds it if its writer dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def temp_files(folder: str | Path, recursive: bool = True) -> list[tuple[Path, int | None]]:
    """The temp files :func:`atomic_path` left in ``folder`` (and below it, when ``recursive``).

    Returns ``(path, writer pid)`` pairs; the pid is None for temp files named before the pid
    was part of the name.  Which of them are stale (their writer is dead) is the caller's call:
    only it knows whether other processes may be writing into the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob(".*") if recursive else folder.glob(".*")):
        if not path.is_file():
            continue
        m = _TEMP.match(path.name)
        if m:
            found.append((path, int(m.group("pid"))))
            continue
        m = _LEGACY_TEMP.match(path.name)
        if m and m.group("suffix") == ("".join(Path(m.group("target")).suffixes) or ".tmp"):
            found.append((path, None))
    return found
