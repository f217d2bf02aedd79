"""The block job that trains one block of a tile: the adapter between the executors
(:mod:`citygen.distributed`) and the one-block trainer (:mod:`citygen.train.trainer`).

Named ``"citygen.train.block_job:train_block_job"`` in a :class:`~citygen.distributed.BlockTask`
(see :func:`citygen.tile.train_tile`, which builds the tasks from ``plan.json``).  It meets the
block job contract of :mod:`citygen.distributed`:

- the run folder is the block's ``out_dir`` (``config.json``, ``metrics.jsonl``,
  ``checkpoints/``, the trainer's layout), checkpoints are the trainer's atomic ones;
- after every checkpoint it calls :func:`~citygen.distributed.report_progress`, so
  ``citygen status TILE`` shows each block's last checkpointed step;
- ``resume=True`` continues exactly from the newest checkpoint, and starts fresh when the
  block has none yet (a first attempt that died before its first checkpoint);
- once a block has reached ``config.steps`` a resumed call trains nothing more.

Only JSON crosses the process boundary, so the config arrives as a plain dict
(:func:`citygen.config.to_dict`) and the box as nested lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..distributed.lease import hold_block
from ..distributed.state import report_progress
from ..store.checkpoint import CHECKPOINTS_DIR, list_checkpoints
from .data import load_survey, read_pixel_masks, select_images
from .trainer import BlockTrainer

JOB = "citygen.train.block_job:train_block_job"


class _ReportingTrainer(BlockTrainer):
    """A :class:`BlockTrainer` that tells the block's state file about each checkpoint."""

    def save(self) -> Path:
        path = super().save()
        report_progress(self.out, self.step)
        return path


def train_block_job(block_id: str, out_dir: str, resume: bool, *, config: dict[str, Any], data: str,
                    image_names: list[str] | None = None, aabb: Any = None, progress: bool = False,
                    pixels: str | None = None, **_: Any) -> dict[str, Any]:
    """Train one block (see the module docstring for the contract).

    Args:
        block_id: the block's id (recorded in the result).
        out_dir: the block's run folder.
        resume: continue from the newest checkpoint in ``out_dir`` if there is one.
        config: the resolved :class:`~citygen.config.TrainConfig` as a dict.
        data: the survey's ``transforms.json`` (or its folder).
        image_names: the block's training images (the plan's ``images``).
        aabb: the block field's box ``[[x0, y0, z0], [x1, y1, z1]]`` in the local frame.
        progress: show the trainer's progress bar (off in workers: their output is a log file).
        pixels: the block's attributed pixels (:func:`citygen.train.data.write_pixel_masks`,
            one mask per image of ``image_names``); None trains on every pixel of its images.

    Returns:
        ``{"block_id", "step", "checkpoint", "train_seconds", "n_images", "aabb", "psnr_train", "resumed_from"}``.
    """
    cfg = from_dict(config, f"block {block_id} config")
    _share_cores(cfg)
    out = Path(out_dir)
    masks = None
    if pixels is not None:
        names = image_names if image_names is not None else [im.name for im in select_images(load_survey(data), None)]
        masks = read_pixel_masks(pixels, names)
    trainer = _ReportingTrainer(cfg, data, out, image_names, aabb, pixel_masks=masks)
    # An executor's attempt holds the block already (this is reentrant); a direct call holds it here.
    with hold_block(out, role=f"block {block_id} job"):
        steps = list_checkpoints(out / CHECKPOINTS_DIR)
        resumed_from = 0
        if resume and steps:
            trainer.restore(out / CHECKPOINTS_DIR)
            resumed_from = trainer.step
        checkpoint = trainer.train(progress)
    return {"block_id": block_id, "step": trainer.step, "checkpoint": str(checkpoint),
            "train_seconds": round(trainer.seconds, 3), "n_images": len(trainer.data.images),
            "aabb": trainer.aabb.tolist(), "psnr_train": _last_train_psnr(trainer.metrics_path),
            "resumed_from": resumed_from}


def _share_cores(cfg) -> None:
    """Respect the executor's share of the cores: with several CPU blocks at once the local
    executor sets OMP_NUM_THREADS per worker, and a preset's ``threads`` must not exceed it."""
    share = os.environ.get("OMP_NUM_THREADS")
    if share and share.isdigit() and int(share) > 0:
        cfg.threads = min(cfg.threads, int(share)) if cfg.threads > 0 else int(share)


def _last_train_psnr(metrics: Path) -> float | None:
    try:
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        return float(json.loads(lines[-1])["psnr_train"]) if lines else None
    except (OSError, ValueError, KeyError):
        return None
