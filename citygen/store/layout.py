"""A tile on disk: the one module that knows where a tile's parts are.

Every reader (renderer, editor, styles, export, viewer, benchmarks, the scheduler's status,
the demo) asks here instead of joining paths itself.  Layout version 1::

    TILE/
      plan.json            the partition (citygen plan; citygen.partition.TilePlan)
      tile_config.json     what train_tile resolved: training config, survey path, each block's
                           field box, and "layout": the layout version (below)
      tile_run.json        the scheduler's block list      } named by citygen.distributed.tile
      .tile_run.lock       one run of the tile at a time   }
      edits.json           the edit stack (citygen.edit.stack)
      edits/               files the stack refers to (restyle weights: <edit id>_<block id>.safetensors)
      block_<id>/          one block's run folder:
        config.json, metrics.jsonl, worker.log            (the trainer, the local executor)
        pixels.npz                                        the pixels attributed to the block (citygen.tile)
        checkpoints/step_XXXXXXX.{safetensors,json}      (citygen.store.checkpoint)
        state.json, result.json                           } named by citygen.distributed.state
        envelope.safetensors                              the block's baked envelope (citygen.render.envelope;
                                                          ``citygen bake-envelope``), stale when older than
                                                          the newest checkpoint
        envelope_view.safetensors                         its inner shell's display levels of detail (viewer)
        .block.lock, lease.json                           } named by citygen.distributed.lease

A single training run folder (``citygen train OUT``: ``checkpoints/`` directly inside) opens as
a one-block tile whose block id is ``"block"``.

**Blocks (one rule for every reader).**  When ``plan.json`` is there the tile is the plan's
blocks, in plan order, and a block is trained when its run folder holds a checkpoint (in
``checkpoints/`` or directly); otherwise a folder whose ``checkpoints/`` holds one is a single
run.  So a folder holding both ``plan.json`` and ``checkpoints/`` is a tile of its plan's
blocks for the renderer, the editor and export alike.

**Version and migration.**  :data:`LAYOUT_VERSION` is written into ``tile_config.json``
(``"layout"``) whenever that record is written (``train_tile``).  A folder without it (every
tile written before the number existed, and single runs, which have no record) is layout 0:
the same files in the same places, so it is read exactly like version 1 and becomes version 1
when the record is next written.  A record with a newer version than this code knows is
refused in one line rather than misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from survey_io import Georef

from ..distributed.lease import LEASE_FILE
from ..distributed.lease import LOCK_FILE as BLOCK_LOCK_FILE
from ..distributed.state import RESULT_FILE, STATE_FILE
from ..distributed.tile import LOCK_FILE as TILE_LOCK_FILE
from ..distributed.tile import MANIFEST_FILE as TILE_RUN_FILE
from ..errors import CitygenError
from ..partition.plan import PLAN_FILE, TilePlan
from .checkpoint import CHECKPOINTS_DIR, list_checkpoints, resolve_checkpoint
from .field import load_field

#: the layout described in the module docstring; 0 = a folder written before it was numbered.
LAYOUT_VERSION = 1
TILE_CONFIG_FILE = "tile_config.json"
STACK_FILE = "edits.json"
#: files an edit refers to (restyle weights), relative to the tile folder.
EDIT_FILES_DIR = "edits"
RUN_CONFIG_FILE = "config.json"
#: a tile block's attributed pixels (per image bit masks at the training resolution; citygen.tile).
PIXELS_FILE = "pixels.npz"
ENVELOPE_FILE = "envelope.safetensors"
ENVELOPE_VIEW_FILE = "envelope_view.safetensors"
#: the block id of a single training run opened as a tile.
SINGLE_BLOCK = "block"


BLOCK_DIR_PREFIX = "block_"


def block_dir(tile_dir: str | Path, block_id: str) -> Path:
    """A block's run folder inside the tile."""
    return Path(tile_dir) / f"{BLOCK_DIR_PREFIX}{block_id}"


def block_run_dirs(tile_dir: str | Path) -> list[Path]:
    """The block run folders present in the tile folder, by name (whatever the plan says)."""
    return sorted(p for p in Path(tile_dir).glob(f"{BLOCK_DIR_PREFIX}*") if p.is_dir())


def block_id_of(run_dir: str | Path) -> str:
    """The block id of a block run folder."""
    return Path(run_dir).name[len(BLOCK_DIR_PREFIX):]


def envelope_file(run_dir: str | Path) -> Path:
    """A block's baked envelope (:mod:`citygen.render.envelope`) inside its run folder."""
    return Path(run_dir) / ENVELOPE_FILE


def envelope_view_file(run_dir: str | Path) -> Path:
    """A block's envelope decimated for display (the viewer's envelope layer) inside its run folder."""
    return Path(run_dir) / ENVELOPE_VIEW_FILE


def stack_path(tile_dir: str | Path) -> Path:
    """The tile's edit stack file."""
    return Path(tile_dir) / STACK_FILE


def edit_file(edit_id: str, block_id: str, suffix: str = ".safetensors") -> str:
    """Where (relative to the tile) an edit keeps a block's file, e.g. restyle weights."""
    return f"{EDIT_FILES_DIR}/{edit_id}_{block_id}{suffix}"


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run folder holds a checkpoint (in ``checkpoints/`` or directly)."""
    run_dir = Path(run_dir)
    return bool(list_checkpoints(run_dir / CHECKPOINTS_DIR) or list_checkpoints(run_dir))


def is_single_run(tile_dir: str | Path) -> bool:
    """A training run folder opened as a one-block tile: no ``plan.json``, a checkpoint in ``checkpoints/``."""
    tile_dir = Path(tile_dir)
    return not (tile_dir / PLAN_FILE).is_file() and bool(list_checkpoints(tile_dir / CHECKPOINTS_DIR))


@dataclass
class TileBlocks:
    """What :func:`discover` found: the plan (None for a single run), the trained blocks' run
    folders in plan order, and the plan's blocks without a checkpoint."""

    plan: TilePlan | None
    trained: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def discover(tile_dir: str | Path) -> TileBlocks:
    """The tile's blocks by the one rule (module docstring).

    Raises:
        CitygenError: naming ``plan.json`` when the folder is neither a tile nor a single run,
        or when the plan is unreadable.
    """
    tile_dir = Path(tile_dir)
    if is_single_run(tile_dir):
        return TileBlocks(None, {SINGLE_BLOCK: tile_dir})
    plan = TilePlan.load(tile_dir / PLAN_FILE)
    found = TileBlocks(plan)
    for b in plan.blocks:
        run = block_dir(tile_dir, b.id)
        if has_checkpoint(run):
            found.trained[b.id] = run
        else:
            found.missing.append(b.id)
    return found


def read_plan(tile_dir: str | Path) -> TilePlan | None:
    """The tile's plan, or None when the folder has no ``plan.json`` (a single run, or not a tile)."""
    path = Path(tile_dir) / PLAN_FILE
    return TilePlan.load(path) if path.is_file() else None


def block_checkpoint(run_dir: str | Path) -> Path:
    """The sidecar of a block's newest checkpoint."""
    return resolve_checkpoint(Path(run_dir))


def open_block_field(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """A block's field as trained (newest checkpoint) and its sidecar metadata.  The edited field
    is the edit layer's: ``citygen.edit.tile_field_wrapper`` wraps this one."""
    return load_field(block_checkpoint(run_dir), device)


def tile_georef(tile_dir: str | Path) -> Georef | None:
    """The tile's georef: from ``plan.json``, else from a block checkpoint's sidecar; None if neither has one."""
    tile_dir = Path(tile_dir)
    sources = [tile_dir / PLAN_FILE]
    try:
        sources += [block_checkpoint(p) for p in discover(tile_dir).trained.values()]
    except CitygenError:
        pass
    for src in sources:
        if src.is_file():
            try:
                d = json.loads(src.read_text()).get("georef")
            except (OSError, ValueError, AttributeError):
                continue
            if d:
                return Georef.from_dict(d)
    return None


def read_tile_config(tile_dir: str | Path) -> dict[str, Any] | None:
    """``tile_config.json`` of a tile, or None when the tile was not trained by ``train_tile``.

    Raises:
        CitygenError: the file is not JSON, or was written by a newer layout than this code reads.
    """
    path = Path(tile_dir) / TILE_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CitygenError(path, f"not valid JSON ({err})") from None
    version = record.get("layout", 0) if isinstance(record, dict) else 0
    if not isinstance(version, int) or isinstance(version, bool) or version > LAYOUT_VERSION:
        raise CitygenError(path, f"tile layout version {version!r} is newer than this citygen reads "
                                 f"(<= {LAYOUT_VERSION}); upgrade citygen")
    return record


def layout_version(tile_dir: str | Path) -> int:
    """The tile's layout version (0: written before the layout was numbered; read the same way)."""
    record = read_tile_config(tile_dir)
    return int(record.get("layout", 0)) if isinstance(record, dict) else 0


def upgraded_tile_config(record: dict[str, Any]) -> dict[str, Any]:
    """The tile record as the current layout writes it (the migration: layout 0 -> 1 only adds
    the version, the files did not move)."""
    return {**record, "layout": LAYOUT_VERSION}


def trained_survey(tile_dir: str | Path) -> Path | None:
    """The survey (``transforms.json``) a tile or run was trained on, when its record names one
    that still exists."""
    tile_dir = Path(tile_dir)
    for name in (TILE_CONFIG_FILE, RUN_CONFIG_FILE):
        p = tile_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text()).get("data")
            except (OSError, ValueError, AttributeError):
                continue
            if data and Path(data).exists():
                path = Path(data)
                return path / "transforms.json" if path.is_dir() else path
    return None


__all__ = ["BLOCK_DIR_PREFIX", "BLOCK_LOCK_FILE", "CHECKPOINTS_DIR", "EDIT_FILES_DIR", "ENVELOPE_FILE", "ENVELOPE_VIEW_FILE", "LAYOUT_VERSION", "LEASE_FILE", "PIXELS_FILE", "PLAN_FILE",
           "RESULT_FILE", "RUN_CONFIG_FILE", "SINGLE_BLOCK", "STACK_FILE", "STATE_FILE", "TILE_CONFIG_FILE",
           "TILE_LOCK_FILE", "TILE_RUN_FILE", "TileBlocks", "block_checkpoint", "block_dir", "block_id_of", "block_run_dirs", "discover",
           "edit_file", "envelope_file", "envelope_view_file", "has_checkpoint", "is_single_run", "layout_version", "open_block_field", "read_plan", "read_tile_config",
           "stack_path", "tile_georef", "trained_survey", "upgraded_tile_config"]
