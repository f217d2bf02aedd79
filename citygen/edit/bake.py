"""Bake: fold a tile's edit stack into new weights, written as a new tile.

Approach (distillation): for each block, the teacher is the block's field seen through the
stack (:class:`EditedField`) and the student a copy of the field.  The student is fine-tuned
for ``steps`` steps on points sampled uniformly in the block and, half of them, in cells the
teacher's occupancy grid marks occupied (near surfaces), each with a random downward view
direction and a random training appearance code, against the teacher's

* density, as opacity over one marching step (L1 on ``log1p(sigma * step)``),
* colour, weighted by the teacher's opacity there (MSE),
* semantics, cross-entropy to the teacher's class, weighted the same way.

The student's occupancy grid becomes the teacher's (edited) grid.  The new tile is a copy
of the tile folder whose blocks get the baked checkpoint as their newest step, and whose
``edits.json`` lists the folded edits under ``baked`` (disabled edits are dropped).

Limits: the student keeps the block's box and hash-grid capacity, so matter an edit moves
outside the box (a building raised above it, an object moved into the next block) is lost,
and fine detail of inserted or moved objects is reproduced only as well as the grid can in
``steps`` steps; surfaces nobody ever saw (under a removed object) are as the ground fill
made them.  A baked tile renders without the per-sample cost of the stack.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from survey_io.atomic import TEMP_MARK, atomic_write_json

from ..errors import CitygenError
from ..store.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..store.layout import LEASE_FILE, STACK_FILE, open_block_field, tile_georef
from .field import EditedField
from .stack import EditStack
from .tile import tile_blocks


def distill(teacher, student, steps: int = 500, batch: int = 8192, lr: float = 1e-2, step_size: float = 0.5,
            seed: int = 0, progress=None) -> list[float]:
    """Fit ``student`` (trainable, CityField interface) to ``teacher`` at random points; returns the losses."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    device = student.aabb.device
    lo, hi = student.aabb[0], student.aabb[1]
    occ = getattr(teacher, "occupancy", None)
    occupied = occ.occupied.nonzero().squeeze(-1) if occ is not None else None
    n_codes = student.appearance.weight.shape[0] if hasattr(student, "appearance") else 0
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr, eps=1e-15)
    losses = []
    for _ in range(steps):
        n_u = batch // 2 if occupied is not None and occupied.numel() else batch
        x = lo + torch.rand(n_u, 3, generator=g).to(device) * (hi - lo)
        if n_u < batch:
            cells = occupied[torch.randint(0, occupied.numel(), (batch - n_u,), generator=g).to(occupied.device)]
            x = torch.cat([x, occ.cell_points(cells, None).to(device)])
            x = torch.minimum(torch.maximum(x, lo), hi)
        d = torch.randn(batch, 3, generator=g).to(device)
        d[:, 2] = -d[:, 2].abs()
        d = d / d.norm(dim=-1, keepdim=True)
        if n_codes:
            codes = student.appearance.weight[torch.randint(0, n_codes, (batch,), generator=g).to(device)].detach()
        else:
            codes = torch.zeros(batch, 0, device=device)
        with torch.no_grad():
            t = teacher(x, d, codes, with_semantics=True)
        s = student(x, d, codes, with_semantics=True)
        alpha = (1 - torch.exp(-t["sigma"].float() * step_size)).detach()
        loss = (torch.log1p(s["sigma"] * step_size) - torch.log1p(t["sigma"].float() * step_size)).abs().mean()
        loss = loss + (alpha[:, None] * (s["rgb"] - t["rgb"].float()) ** 2).mean() * 3
        loss = loss + 0.1 * (alpha * F.cross_entropy(s["semantics"], t["semantics"].argmax(-1), reduction="none")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(len(losses), losses[-1])
    return losses


@torch.no_grad()
def copy_occupancy(teacher, student) -> None:
    """Make the student's grid the teacher's (queried at the student's cell centres)."""
    grid_t, grid_s = getattr(teacher, "occupancy", None), getattr(student, "occupancy", None)
    if grid_t is None or grid_s is None:
        return
    r = grid_s.resolution
    cells = torch.arange(grid_s.n_cells, device=grid_s.occupied.device)
    ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
    x = grid_s.aabb[0] + (ijk + 0.5) / r * (grid_s.aabb[1] - grid_s.aabb[0])
    occ = grid_t.query(x)
    grid_s.occupied.copy_(occ)
    grid_s.density.copy_(torch.where(occ, grid_s.density.clamp_min(1e-2), torch.zeros_like(grid_s.density)))


def bake_tile(tile_dir: str | Path, out_dir: str | Path, steps: int = 500, batch: int = 8192, device: str = "cpu",
              seed: int = 0) -> dict:
    """Write ``out_dir``: a copy of the tile with its active edits folded into every block's weights.

    Returns a report: block -> {checkpoint, final loss, steps}.
    """
    tile_dir, out_dir = Path(tile_dir).resolve(), Path(out_dir).resolve()
    if out_dir == tile_dir or tile_dir in out_dir.parents:
        raise CitygenError(out_dir, "bake output must be outside the tile folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CitygenError(out_dir, "bake output folder exists and is not empty")
    stack = EditStack.load(tile_dir)
    if not stack.active():
        raise CitygenError(tile_dir / STACK_FILE, "no active edits to bake")
    blocks = tile_blocks(tile_dir)
    georef = tile_georef(tile_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.baking")
    if tmp.exists():
        shutil.rmtree(tmp)
    # a baked tile is new: no temp files of the source's writers, no locks or leases of its trainers
    shutil.copytree(tile_dir, tmp, ignore=shutil.ignore_patterns(f"*{TEMP_MARK}*", ".*.tmp", ".*.lock", LEASE_FILE))
    report = {}
    for block_id, folder in blocks.items():
        field, meta = open_block_field(folder, device)
        teacher = EditedField(field, stack, georef=georef, tile_dir=tile_dir, block_id=block_id)
        student = copy.deepcopy(field).train()
        step_size = float(meta["train_config"].render.step_size)
        losses = distill(teacher, student, steps=steps, batch=batch, step_size=step_size, seed=seed)
        copy_occupancy(teacher, student)
        sidecar = resolve_checkpoint(folder)
        _, old_meta = load_checkpoint(sidecar, "cpu")  # validated sidecar of the source weights
        new_tensors = {f"model.{k}": v for k, v in student.state_dict().items()}
        rel = sidecar.parent.relative_to(folder)
        new_meta = {k: v for k, v in old_meta.items()
                    if k not in ("format", "step", "tensors_file", "tensors_bytes", "optimizer")}
        new_meta["baked_edits"] = [e["id"] for e in stack.active()]
        new_meta["optimizer"] = {"type": "none", "groups": []}
        step = int(old_meta["step"]) + steps
        ckpt = save_checkpoint(tmp / folder.relative_to(tile_dir) / rel, step, new_tensors, new_meta, keep=0)
        report[block_id] = {"checkpoint": str(out_dir / ckpt.relative_to(tmp)), "steps": steps,
                            "final_loss": losses[-1] if losses else None}
    baked = EditStack(baked=stack.baked + stack.active(), ground=stack.ground)
    atomic_write_json(tmp / STACK_FILE, baked.to_dict())
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return report


__all__ = ["bake_tile", "copy_occupancy", "distill"]
