"""A block task: which job trains which block into which folder, and how to find the job."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CitygenError

BlockJob = Callable[..., dict]


@dataclass(frozen=True)
class BlockTask:
    """One block to train.

    Attributes:
        block_id: the block's id, unique within the tile.
        out_dir: the block's folder (checkpoints, state.json, result.json); made absolute.
            On a multi-node Ray cluster it must be on a file system every node sees at the
            same path.
        job: the block job as a dotted path ``"package.module:function"`` (see the package
            docstring for the contract it must meet).
        kwargs: extra keyword arguments for the job; JSON-serializable, since they travel to
            worker processes as JSON.
    """

    block_id: str
    out_dir: str
    job: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.block_id, str) or not self.block_id:
            raise CitygenError(None, f"block id must be a non-empty string, got {self.block_id!r}")
        # Absolute, since workers (Ray's above all) need not share the driver's working directory.
        object.__setattr__(self, "out_dir", os.path.abspath(self.out_dir))
        split_job_path(self.job)
        try:
            json.dumps(self.kwargs)
        except (TypeError, ValueError) as err:
            raise CitygenError(None, f"block {self.block_id}: job kwargs are not JSON-serializable ({err})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"block_id": self.block_id, "out_dir": self.out_dir, "job": self.job, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockTask":
        return cls(block_id=d["block_id"], out_dir=d["out_dir"], job=d["job"], kwargs=d.get("kwargs", {}))

    @property
    def path(self) -> Path:
        return Path(self.out_dir)


def split_job_path(job: str) -> tuple[str, str]:
    """``"pkg.mod:fn"`` -> ``("pkg.mod", "fn")``; a CitygenError for anything else."""
    module, sep, name = job.partition(":") if isinstance(job, str) else ("", "", "")
    if not sep or not module or not name.isidentifier():
        raise CitygenError(None, f"block job must be 'module:function', got {job!r}")
    return module, name


def resolve_job(job: str) -> BlockJob:
    """Import the block job named by ``"module:function"``.

    Raises:
        CitygenError: the module cannot be imported or has no such callable.
    """
    module_name, name = split_job_path(job)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CitygenError(None, f"block job {job!r}: cannot import {module_name} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CitygenError(None, f"block job {job!r}: {module_name} has no function {name}")
    return fn
