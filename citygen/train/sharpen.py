"""Sharpening fine-tune (``citygen sharpen``): a short continuation of a trained block that makes
its surfaces opaque, so that the real-time march (and its narrow band,
:mod:`citygen.render.envelope`) stops within a step or two of each surface.

Why: a young field's surfaces are a semi-transparent layer several metres thick (opacity 1e-2..0.5
per step), and early termination has to march through it sample by sample (6.6 samples per pixel
on a 1000-step ``tiny`` block, with or without the band).  The fine-tune continues training from
the run's last checkpoint, on the same images, losses and occupancy schedule, at the run's final
learning rate (constant by default: the schedule is over; ``lr_final`` < 1 decays it over the
fine-tune along half a cosine), with one more loss: the per-sample opacity entropy
``sum_k T_k H(alpha_k)`` (``render_rays(alpha_entropy=True)``, weight
``optim.alpha_entropy_weight``), which is zero only when every visible sample is empty or opaque;
the photometric loss keeps what the surface looks like.  Optionally a stronger distortion loss
(``optim.distortion_weight``).  Measured figures are in DESIGN.md ("Envelope and narrow band").

The result is a new run folder (the source run is never written): ``config.json`` (the source's
config with the fine-tune's weights and ``steps`` = the step it ends at), ``metrics.jsonl``,
``checkpoints/`` and ``eval/`` (and a tile block's ``pixels.npz``, its attributed pixels), readable by
every command that takes a run.

A tile (a folder with ``plan.json``: ``citygen train-tile``, ``citygen demo``) is sharpened block by
block (:func:`sharpen_tile`) into a new tile folder laid out like the source
(:mod:`citygen.store.layout`): its ``plan.json`` and ``tile_config.json`` copied, each sharpened
block's run in its ``block_<id>`` folder, so the renderer, viewer, bench and export open it like
the source.  A block is sharpened into a hidden staging folder and renamed into place when it is
finished, so a block folder in the new tile is always a finished one: a second call skips those
and redoes a block whose staging folder an interrupted call left behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from survey_io.atomic import atomic_write_bytes, atomic_write_json

from ..config import from_dict, validate
from ..distributed.lease import hold_block
from ..errors import CitygenError
from ..nets.lpips import load_lpips
from ..store.checkpoint import read_sidecar, resolve_checkpoint
from ..store.layout import PIXELS_FILE, PLAN_FILE, TILE_CONFIG_FILE, block_dir, discover, read_tile_config
from .data import read_pixel_masks, write_pixel_masks
from .evaluate import evaluate
from .schedule import cosine_decay
from .trainer import BlockTrainer

#: session 7 on the demo tile's 2100-step block (DESIGN.md "Towards 1.5 samples per pixel, session
#: 7"), with the density ceiling of ``render_rays(alpha_entropy=True)``: weight 0.02 for 1500 steps
#: 3.41 -> 2.13 samples per pixel, 53.7 dB worst against the reference, +0.59 dB against the survey's
#: images (114 s of one core; 1.42 with session 8's quarter-step fine occupancy cells, the
#: real-time sampler's default since); without the ceiling 0.02 diverged within 732 steps and 0.01 for 1000
#: steps gave 2.21 (the previous default).  On a 1000-step tiny-city block (uncapped, 300 steps)
#: 0.03 and 0.1 lost 0.33 and 0.97 dB against 0.01 (DESIGN.md "Sharpening fine-tune")
DEFAULT_ALPHA_ENTROPY_WEIGHT = 0.02
DEFAULT_STEPS = 1500
#: the fine-tune's rate falls from the run's final rate to this fraction of it (half a cosine over
#: the fine-tune; 1: constant).  Measured on the demo block (DESIGN.md "Towards 1.5 samples per
#: pixel", session 7): a decay to 0.1 over 1000 steps sharpens less than the constant rate (2.37
#: instead of 2.21 samples per pixel); over 2000 steps it reaches 2.06 without diverging but the
#: real-time render falls to 32.6 dB against the reference and one view loses 0.8 dB against its
#: image: the constant rate stays the default, the decay is an option
DEFAULT_LR_FINAL = 1.0


@dataclass
class SharpenResult:
    out: Path
    checkpoint: Path
    start_step: int
    step: int
    seconds: float
    eval: dict[str, Any] | None = None


def sharpen_block(checkpoint: Path | str, out: Path | str, steps: int = DEFAULT_STEPS,
                  alpha_entropy_weight: float = DEFAULT_ALPHA_ENTROPY_WEIGHT,
                  distortion_weight: float | None = None, data: Path | str | None = None,
                  threads: int | None = None, evaluate_at_end: bool = True, progress: bool = True,
                  lpips_weights: Path | str | None = None, lr_final: float = DEFAULT_LR_FINAL) -> SharpenResult:
    """Fine-tune the block of ``checkpoint`` (a run folder, checkpoints folder or sidecar) for
    ``steps`` more steps with the opacity-entropy loss (module docstring) into the run folder ``out``.

    Args:
        data: the survey (default: the one the run trained on, as recorded in the checkpoint).
        distortion_weight: replaces the run's ``optim.distortion_weight`` when given.
        threads: CPU threads (default: the run's).
        lr_final: the rate at the end, as a fraction of the run's final rate (half a cosine down
            to it; 1: constant).
    """
    if steps < 1:
        raise CitygenError(None, f"sharpen: --steps must be at least 1, got {steps}")
    if not 0 < lr_final <= 1:
        raise CitygenError(None, f"sharpen: --lr-final must be in (0, 1], got {lr_final}")
    sidecar = resolve_checkpoint(Path(checkpoint))
    meta = read_sidecar(sidecar)
    out = Path(out)
    if out.resolve() == sidecar.parent.parent.resolve():
        raise CitygenError(out, "sharpen: --out must be a new run folder, not the source run")
    cfg = from_dict(meta["config"], str(sidecar))
    start = int(meta["step"])
    cfg.optim.alpha_entropy_weight = alpha_entropy_weight
    if distortion_weight is not None:
        cfg.optim.distortion_weight = distortion_weight
    if threads is not None:
        cfg.threads = threads
    schedule_steps = cfg.steps
    cfg.steps = start + steps
    validate(cfg, sidecar)
    survey = data if data is not None else meta.get("survey_root")
    if survey is None:
        raise CitygenError(sidecar, "sharpen: the checkpoint does not record its survey: pass --data")
    lpips_net = load_lpips(lpips_weights) if evaluate_at_end else None
    names = list(meta["image_names"])
    # a tile block keeps to its attributed pixels (citygen.tile), as in its training
    pixels = sidecar.parent.parent / PIXELS_FILE
    masks = read_pixel_masks(pixels, names) if pixels.is_file() else None
    trainer = BlockTrainer(cfg, survey, out, names, meta["aabb"], pixel_masks=masks)
    with hold_block(out, role="citygen sharpen"):
        if masks is not None:
            # the new run keeps the attribution, or a run sharpened further (or resumed) from it
            # trains on every pixel of its images: the demo block's continuation fell from 24.3
            # to 15.0 dB train PSNR within 50 steps and then diverged
            write_pixel_masks(out / PIXELS_FILE, names, masks)
        trainer.restore(sidecar)
        # the source run's learning-rate schedule has ended: continue at its final rate
        trainer.schedule_steps = max(schedule_steps, start)
        # times the optional decay (lr_final < 1; 1, the default, keeps it constant: DEFAULT_LR_FINAL)
        trainer.lr_extra = partial(cosine_decay, steps=steps, final=lr_final)
        trainer.lr_extra_from = start
        trainer.seconds = trainer.cpu_seconds = 0.0
        ckpt = trainer.train(progress)
        report = None
        if evaluate_at_end and trainer.survey.test_names:
            report = evaluate(ckpt, trainer.survey, out / "eval", lpips_weights=lpips_net)
    return SharpenResult(out=out, checkpoint=ckpt, start_step=start, step=trainer.step, seconds=trainer.seconds,
                         eval=report)


#: prefix of a block's staging folder inside the new tile while it is sharpened (hidden: not a
#: ``block_*`` folder, so no reader takes it for a block)
STAGING_PREFIX = ".sharpen_"


@dataclass
class TileSharpenResult:
    out: Path
    sharpened: dict[str, SharpenResult]
    skipped: list[str]


def sharpen_tile(tile: Path | str, out: Path | str, blocks: list[str] | None = None,
                 **kwargs: Any) -> TileSharpenResult:
    """Sharpen the trained blocks of the tile folder ``tile`` (or only ``blocks``) with
    :func:`sharpen_block` (``kwargs``: its options) into the tile folder ``out`` (module
    docstring); blocks already in ``out`` are skipped.

    Raises:
        CitygenError: ``tile`` is not a tile, ``out`` lies inside it (or is it) or holds another
        tile's plan, a block id is not in the plan or the block has no checkpoint.
    """
    tile, out = Path(tile), Path(out)
    if not (tile / PLAN_FILE).is_file():
        raise CitygenError(tile, f"sharpen: not a tile folder (no {PLAN_FILE}); pass a block's run folder "
                                 "to sharpen one block")
    src, dst = tile.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise CitygenError(out, "sharpen: --out must be a new folder outside the source tile")
    found = discover(tile)
    plan_ids = [b.id for b in found.plan.blocks]
    wanted = plan_ids if blocks is None else list(dict.fromkeys(blocks))
    for b in wanted:
        if b not in plan_ids:
            raise CitygenError(tile / PLAN_FILE, f"sharpen: unknown block {b!r} (the plan has {', '.join(plan_ids)})")
        if b not in found.trained and blocks is not None:
            raise CitygenError(block_dir(tile, b), f"sharpen: block {b!r} has no checkpoint (train it first)")
    wanted = [b for b in wanted if b in found.trained]
    if not wanted:
        raise CitygenError(tile, "sharpen: no block of this tile has a checkpoint (train it: citygen train-tile)")
    plan_bytes = (tile / PLAN_FILE).read_bytes()
    if (out / PLAN_FILE).is_file() and (out / PLAN_FILE).read_bytes() != plan_bytes:
        raise CitygenError(out / PLAN_FILE, "sharpen: --out holds another tile (its plan differs from the source's)")
    # the tile's record first, so that an interrupted call leaves a tile with blocks missing
    # (which every reader handles) rather than block folders without a tile
    atomic_write_bytes(out / PLAN_FILE, plan_bytes)
    record = read_tile_config(tile)
    if record is not None:
        atomic_write_json(out / TILE_CONFIG_FILE, {**record, "sharpened_from": str(src)})
    done: dict[str, SharpenResult] = {}
    skipped = []
    for b in wanted:
        final = block_dir(out, b)
        if final.is_dir():
            skipped.append(b)  # only finished blocks are renamed into place
            continue
        staging = out / f"{STAGING_PREFIX}{b}"
        if staging.exists():
            shutil.rmtree(staging)  # an interrupted call's: its checkpoints are part-way
        done[b] = sharpen_block(found.trained[b], staging, **kwargs)
        os.replace(staging, final)
        done[b] = replace(done[b], out=final, checkpoint=final / done[b].checkpoint.relative_to(staging))
    return TileSharpenResult(out=out, sharpened=done, skipped=skipped)


__all__ = ["DEFAULT_ALPHA_ENTROPY_WEIGHT", "DEFAULT_LR_FINAL", "DEFAULT_STEPS", "STAGING_PREFIX", "SharpenResult",
           "TileSharpenResult", "sharpen_block", "sharpen_tile"]
