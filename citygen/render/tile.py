"""Rendering a whole tile: every block's field blended into one seamless field.

Each block's field knows only its own box (the block's extended rectangle, core plus
margin, times its height range).  Where extended rectangles overlap, the blocks are
blended **in space, sample by sample**, and the blend is then volume-rendered like a
single field (the reference renderer, :func:`citygen.render.volume.render_rays`):

* Blend weight of block ``b`` at a point ``x`` (horizontal only, the grid is cut on the
  ground plane): per axis, ``u = min(x - e0, e1 - x) / margin`` on that side (``e0, e1`` the
  extended rectangle), clamped to [0, 1], so ``u`` ramps from 0 on the extended boundary to
  1 on the core boundary and stays 1 inside the core; ``w_b = S(u_x) * S(u_y)`` with the
  smoothstep ``S(u) = u^2 (3 - 2u)`` (continuous with a continuous derivative; zero outside
  the field's box).  Weights are normalised over the blocks covering ``x`` by
  ``omega_b = w_b / max(1, sum_k w_k)``: a partition of unity wherever a core covers ``x``
  (its block has ``w = 1`` there), so inside a core away from the margin band only that
  block counts and on a shared core edge two neighbours count half each; where no core
  covers ``x`` (the tile's outer margin, or heights outside the core block's box) a lone
  block fades out towards its box boundary instead of being stretched to full weight, which
  would switch its density on abruptly there.
* Blended field: density the weighted geometric mean ``sigma = W prod_b sigma_b^(omega_b / W)``
  with ``W = sum_b omega_b`` (<= 1: the fade towards the tile's outer edge), each ``sigma_b``
  floored at :data:`DENSITY_FLOOR` (and the result never above ``sum_b omega_b sigma_b``);
  colour and semantic logits are density-weighted means
  ``c = sum_b omega_b sigma_b c_b / sum_b omega_b sigma_b`` (a block that is empty at ``x`` does
  not dilute its neighbour's colour).  Where two blocks agree, and wherever one block alone
  covers ``x``, it is that density; where they disagree it leans to the emptier one, so a haze
  or floater that only one block grew in the overlap fades instead of being kept.  The
  arithmetic mean ``sum_b omega_b sigma_b`` (``density_blend="linear"``, the rule until session
  11) keeps the union of both blocks' matter there: on the failure-like tile (5 seeds) it made
  the built patch's building edges fatter and the DSM RMSE 0.6 m worse than the geometric mean,
  for 0.1 dB more held-out PSNR (DESIGN.md, "Blending blocks' densities").
* Compositing the blended field along each ray (rather than rendering each block on its
  own and mixing the finished pixels) keeps occlusion right across block boundaries: a
  building deep in one block's core in front of a neighbour's ground hides it instead of
  being averaged with it.  Depth and semantics come out of the same quadrature, so they are
  blended with the same weights as the colour.
* ``weights`` in the output: each block's share of what the ray accumulated (the blended
  quadrature weights split by ``omega_b sigma_b / sigma``), normalised to sum to 1 over the
  blocks on every ray that hit something, 0 on rays that hit nothing.
* Background (what rays see where they accumulate nothing): ``background_color`` when set,
  else the learned background of the block whose core is nearest (horizontally) to where the
  ray leaves the tile's box.

Appearance: codes stay per block (each block learned codes for its own training images).
With ``appearance=None`` every block applies its own test-view rule, the code of *its*
nearest training camera to the ray's origin (:meth:`CityField.appearance_for_position`);
an image name uses that image's code in the blocks that trained on it (the rule elsewhere);
a tensor, (A,) or one row per ray (N, A), is used as the code in every block; a
``{block_id: code (A,)}`` dict sets codes per block (the rule for blocks it leaves out).

Which blocks a tile folder has is :mod:`citygen.store.layout`'s rule (the plan's blocks with a
checkpoint; a single training run folder, ``checkpoints/`` and no ``plan.json``, opens as a
one-block tile, block id ``"block"``, whose blend is the field itself).

Fields are loaded lazily (``load_field`` of each block's newest checkpoint) into an LRU
cache of ``max_cached_blocks``; one call may hold more when its rays cross more blocks.
``field_loads`` counts the loads (cache misses), ``field_bytes`` is the most memory one loaded
field takes (its model tensors, read from the checkpoint's header), so that a caller that
sizes the cache (:meth:`TileRenderer.set_cache_size`; the export does) can count it.
``field_wrapper(block_id, field) -> field_like`` (editing, styling) is applied as a block is
loaded; the wrapped object must offer what the volume renderer calls (``aabb``,
``n_classes``, ``__call__(x, dirs, appearance, ray_index=..., with_semantics=...)`` ->
``sigma``/``rgb``/``semantics``, ``background(dirs)``, ``background_semantics``); its
``occupancy`` attribute, when it has one, replaces the block's grid (set it to None when
the wrapper adds density where the original field had none).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from survey_io import Camera, Georef

from ..config import RenderConfig, from_dict
from ..errors import CitygenError
from ..partition import Block, Grid, TilePlan
from ..store import layout
from ..store.checkpoint import read_sidecar
from ..store.field import load_field
from ..store.layout import SINGLE_BLOCK
from .sampling import camera_rays, intersect_aabb
from .volume import render_rays as volume_render_rays

FieldWrapper = Callable[[str, Any], Any]
#: ``fn(tile_dir) -> FieldWrapper`` applying a tile's edit stack; set by citygen.edit on import
#: (the editor builds on the renderer, so the renderer cannot import it: dependency inversion).
EditOpener = Callable[[Path], FieldWrapper]
_edit_opener: EditOpener | None = None


def register_edit_opener(opener: EditOpener) -> None:
    """How :meth:`TileRenderer.open` opens a tile as edited (called by :mod:`citygen.edit`)."""
    global _edit_opener
    _edit_opener = opener


@dataclass
class BlockSource:
    """One renderable block: its rectangles, its field's box, and how to load its field."""

    id: str
    core: tuple[float, float, float, float]
    extended: tuple[float, float, float, float]
    aabb: np.ndarray                      # (2, 3) box of the field, local metres
    load: Callable[[], Any]               # -> the field (with ``.occupancy``)
    image_names: tuple[str, ...] = ()     # the images its appearance codes belong to, in order
    nbytes: int = 0                       # memory of the loaded field (0: not known)
    load_nbytes: int = 0                  # memory while it loads (the whole tensor file is read)


def smoothstep(u: Tensor) -> Tensor:
    u = u.clamp(0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def blend_weights(points: Tensor, cores: Tensor, extended: Tensor, aabbs: Tensor) -> Tensor:
    """Unnormalised blend weights (N, B) of B blocks at points (N, 3) (rule: module docstring).

    Args:
        cores, extended: (B, 4) rectangles (x0, y0, x1, y1).
        aabbs: (B, 2, 3) field boxes; weights are 0 outside them.
    """
    xy = points[:, None, :2]                                          # (N, 1, 2)
    e0, e1 = extended[None, :, :2], extended[None, :, 2:]             # (1, B, 2)
    c0, c1 = cores[None, :, :2], cores[None, :, 2:]
    m0, m1 = c0 - e0, e1 - c1
    # distance into the extended rectangle over the margin on each side; a side without margin
    # is a hard edge (inside the core = 1).
    u0 = torch.where(m0 > 0, (xy - e0) / m0.clamp_min(1e-12), (xy >= c0).to(xy.dtype))
    u1 = torch.where(m1 > 0, (e1 - xy) / m1.clamp_min(1e-12), (xy <= c1).to(xy.dtype))
    s = smoothstep(torch.minimum(u0, u1))                             # (N, B, 2)
    w = s[..., 0] * s[..., 1]
    inside = ((points[:, None, :] >= aabbs[None, :, 0]) & (points[:, None, :] <= aabbs[None, :, 1])).all(-1)
    return w * inside


class _BlendedOccupancy:
    """Occupied where any block's occupancy grid is (each grid is False outside its box)."""

    def __init__(self, grids: list[Any], aabbs: Tensor):
        self.grids, self.aabbs = grids, aabbs

    def query(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, 3)
        occ = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        for grid, box in zip(self.grids, self.aabbs):
            if grid is None:
                occ |= ((flat >= box[0]) & (flat <= box[1])).all(-1)
            else:
                occ |= grid.query(flat)
        return occ.reshape(x.shape[:-1])


#: Densities below this (1/m) count as this in the geometric blend, so that a block that is
#: empty at a point (density 0 after ``trunc_exp`` underflow) vetoes its neighbour's haze
#: there without sending the logarithm to -inf.
DENSITY_FLOOR = 1e-6
DENSITY_BLENDS = ("geometric", "linear")


class _BlendedField:
    """The tile's blocks as one field for the reference volume renderer.

    Its "semantics" output carries the class logits followed by one channel per block, the
    block's share ``omega_b sigma_b / sigma`` of the density, so that the renderer's
    quadrature accumulates each block's weight along the ray for free.
    """

    def __init__(self, fields: list[Any], cores: Tensor, extended: Tensor, aabbs: Tensor, code_dims: list[int],
                 n_classes: int, background_rgb: Tensor, background_semantics: Tensor, box: Tensor | None = None,
                 density_blend: str = "geometric"):
        if density_blend not in DENSITY_BLENDS:
            raise CitygenError(None, f"density_blend must be one of {', '.join(DENSITY_BLENDS)}, got {density_blend!r}")
        self.fields = fields
        self.density_blend = density_blend
        self.cores, self.extended, self.aabbs = cores, extended, aabbs
        # the box the renderer marches (its samples start where a ray enters it): the whole
        # tile's, so a ray's samples do not depend on which blocks the other rays of its chunk meet
        self.aabb = box if box is not None else torch.stack([aabbs[:, 0].amin(0), aabbs[:, 1].amax(0)])
        self.code_slices = []
        start = 0
        for d in code_dims:
            self.code_slices.append(slice(start, start + d))
            start += d
        self.n_real_classes = n_classes
        self.n_classes = n_classes + len(fields)
        self._background_rgb = background_rgb
        self.background_semantics = torch.cat(
            [background_semantics, background_semantics.new_zeros(background_semantics.shape[0], len(fields))], -1)

    def background(self, dirs: Tensor) -> Tensor:
        return self._background_rgb

    def weights(self, x: Tensor) -> Tensor:
        w = blend_weights(x, self.cores, self.extended, self.aabbs)
        return w / w.sum(-1, keepdim=True).clamp_min(1.0)

    def __call__(self, x: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None,
                 with_semantics: bool = True) -> dict[str, Tensor]:
        n, C, B = x.shape[0], self.n_real_classes, len(self.fields)
        omega = self.weights(x)
        geometric = self.density_blend == "geometric"
        total = omega.sum(-1)
        log_sigma = x.new_zeros(n)  # geometric blend: sum_b (omega_b / W) log sigma_b
        sigma = x.new_zeros(n)
        rgb = x.new_zeros(n, 3)
        sem = x.new_zeros(n, C)
        share = x.new_zeros(n, B)
        for b, field in enumerate(self.fields):
            idx = (omega[:, b] > 0).nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            code = appearance[:, self.code_slices[b]]
            if ray_index is None:  # per-sample directions and codes
                out = field(x[idx], dirs[idx], code[idx], with_semantics=True)
            else:
                out = field(x[idx], dirs, code, ray_index=ray_index[idx], with_semantics=True)
            sigma_b = out["sigma"].float()
            s = omega[idx, b] * sigma_b
            sigma.index_add_(0, idx, s)
            if geometric:
                log_sigma.index_add_(0, idx, omega[idx, b] / total[idx] * torch.log(sigma_b.clamp_min(DENSITY_FLOOR)))
            rgb.index_add_(0, idx, s[:, None] * out["rgb"].float())
            sem.index_add_(0, idx, s[:, None] * out["semantics"].float())
            share[idx, b] = s
        inv = 1.0 / sigma.clamp_min(1e-12)  # colours and logits: density-weighted means either way
        if geometric:
            # never above the weighted sum (the arithmetic mean bounds the geometric one; only
            # densities under the floor could lift it there, e.g. empty space stays empty)
            sigma = torch.where(total > 0, torch.minimum(torch.exp(log_sigma) * total, sigma), sigma)
        return {"sigma": sigma, "rgb": rgb * inv[:, None],
                "semantics": torch.cat([sem * inv[:, None], share * inv[:, None]], -1)}


class TileRenderer:
    """Renders a trained tile (all its blocks blended; see the module docstring).

    Build it with :meth:`open` (a tile folder) or directly from :class:`BlockSource` s.

    Attributes:
        plan: the tile's :class:`~citygen.partition.TilePlan`.
        georef: the tile's georeference (local frame <-> CRS).
        classes: semantic class names (the fields' logits order).
        bounds: (2, 3) local min/max over all renderable blocks' field boxes.
        block_ids: the renderable blocks (those with a checkpoint), in plan order.
        missing_blocks: blocks of the plan without a checkpoint (rendered as empty space).
        render_config: marching settings (step size, termination, chunking).
        background_color: None (learned backgrounds) or an RGB triple in [0, 1].
        density_blend: how overlapping blocks' densities combine: ``"geometric"`` (weighted
            geometric mean, the default) or ``"linear"`` (weighted sum); module docstring.
        field_wrapper: ``fn(block_id, field) -> field_like`` applied to each loaded field.
    """

    def __init__(self, plan: TilePlan, sources: list[BlockSource], *, classes: tuple[str, ...] | list[str],
                 render_config: RenderConfig | None = None, device: str | torch.device = "cpu",
                 max_cached_blocks: int = 8, missing_blocks: list[str] | None = None):
        if not sources:
            raise CitygenError(None, "tile renderer: no block has a trained field")
        if max_cached_blocks < 1:
            raise CitygenError(None, f"max_cached_blocks must be >= 1, got {max_cached_blocks}")
        self.plan = plan
        self.georef: Georef = plan.georef
        self.classes = tuple(classes)
        self.sources = {s.id: s for s in sources}
        self.block_ids = [s.id for s in sources]
        self.missing_blocks = list(missing_blocks or [])
        self.render_config = render_config or RenderConfig()
        self.device = torch.device(device)
        self.max_cached_blocks = int(max_cached_blocks)
        self.background_color: tuple[float, float, float] | None = None
        self.density_blend = "geometric"
        self._field_wrapper: FieldWrapper | None = None
        self._cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.field_loads = 0
        f32 = {"dtype": torch.float32, "device": self.device}
        self._cores = torch.tensor([s.core for s in sources], **f32)
        self._extended = torch.tensor([s.extended for s in sources], **f32)
        self._aabbs = torch.tensor(np.stack([np.asarray(s.aabb, dtype=np.float64) for s in sources]), **f32)
        self.bounds = np.stack([self._aabbs[:, 0].amin(0).cpu().numpy(),
                                self._aabbs[:, 1].amax(0).cpu().numpy()]).astype(np.float64)
        self._box = torch.stack([self._aabbs[:, 0].amin(0), self._aabbs[:, 1].amax(0)])

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def open(cls, tile_dir: str | Path, device: str | torch.device = "cpu", max_cached_blocks: int = 8,
             apply_edits: bool = True) -> TileRenderer:
        """A renderer over the tile's trained blocks (:mod:`citygen.store.layout` finds them: the
        plan's blocks with a checkpoint, or a single training run); blocks of the plan without one
        are listed in ``missing_blocks``.

        The tile's edit stack (``tile_dir/edits.json``, :mod:`citygen.edit`) is applied at render
        time when present, so views, exports and the viewer all show the edited scene;
        ``apply_edits=False`` renders the trained weights as they are.  The renderer does not
        import the editor: :mod:`citygen.edit` registers how to open a tile as edited
        (:func:`register_edit_opener`); ``citygen.tile.open_tile`` is the entry point that
        always has it.

        Raises:
            CitygenError: no plan, a broken checkpoint sidecar, no block trained at all, or an
            edit stack while the editor is not loaded.
        """
        renderer = cls.open_trained(tile_dir, device, max_cached_blocks)
        stack = layout.stack_path(tile_dir)
        if apply_edits and stack.is_file():
            if _edit_opener is None:
                raise CitygenError(stack, "the tile has edits but citygen.edit is not loaded: open it with "
                                          "citygen.tile.open_tile, or pass apply_edits=False")
            renderer.field_wrapper = _edit_opener(Path(tile_dir))
        return renderer

    @classmethod
    def open_trained(cls, tile_dir: str | Path, device: str | torch.device = "cpu",
                     max_cached_blocks: int = 8) -> TileRenderer:
        """A renderer over the tile's blocks as trained (no edits); see :meth:`open`.

        A single training run folder is a one-block "tile" (block id ``"block"``, core = extended
        = the field's box, so the blend is the field itself).
        """
        tile_dir = Path(tile_dir)
        found = layout.discover(tile_dir)
        if found.plan is None:
            return cls._single_run(found.trained[layout.SINGLE_BLOCK], device, max_cached_blocks)
        plan = found.plan
        sources, classes, render_cfg = [], None, None
        for b in plan.blocks:
            if b.id not in found.trained:
                continue
            sidecar = layout.block_checkpoint(found.trained[b.id])
            meta, aabb, block_classes, cfg = _read_sidecar(sidecar)
            if classes is None:
                classes, render_cfg = block_classes, cfg.render
            elif block_classes != classes:
                raise CitygenError(sidecar, f"block {b.id} has classes {list(block_classes)}, the tile {list(classes)}")
            sources.append(BlockSource(b.id, b.core, b.extended, aabb, _checkpoint_loader(sidecar, device),
                                       tuple(meta.get("image_names", ())), *_field_nbytes(sidecar, meta)))
        if not sources:
            raise CitygenError(tile_dir, "no block of this tile has a checkpoint yet (train it: citygen train-tile)")
        return cls(plan, sources, classes=classes, render_config=render_cfg, device=device,
                   max_cached_blocks=max_cached_blocks, missing_blocks=found.missing)

    @classmethod
    def _single_run(cls, run: Path, device: str | torch.device, max_cached_blocks: int) -> TileRenderer:
        sidecar = layout.block_checkpoint(run)
        meta, aabb, classes, cfg = _read_sidecar(sidecar)
        if "georef" not in meta:
            raise CitygenError(sidecar, "checkpoint sidecar has no georef")
        rect = (float(aabb[0, 0]), float(aabb[0, 1]), float(aabb[1, 0]), float(aabb[1, 1]))
        grid = Grid(origin=rect[:2], block_size=(rect[2] - rect[0], rect[3] - rect[1]), rows=1, cols=1)
        block = Block(id=SINGLE_BLOCK, row=0, col=0, core=rect, extended=rect,
                      z_range=(float(aabb[0, 2]), float(aabb[1, 2])), images=list(meta.get("image_names", [])))
        plan = TilePlan(georef=Georef.from_dict(meta["georef"]), grid=grid, margin_m=0.0, blocks=[block])
        source = BlockSource(SINGLE_BLOCK, rect, rect, aabb, _checkpoint_loader(sidecar, device),
                             tuple(meta.get("image_names", ())), *_field_nbytes(sidecar, meta))
        return cls(plan, [source], classes=classes, render_config=cfg.render, device=device,
                   max_cached_blocks=max_cached_blocks)

    # -- field cache ---------------------------------------------------------------------------
    @property
    def field_wrapper(self) -> FieldWrapper | None:
        return self._field_wrapper

    @field_wrapper.setter
    def field_wrapper(self, fn: FieldWrapper | None) -> None:
        self._field_wrapper = fn
        self.clear_cache()  # fields loaded before were not wrapped (or wrapped by the old function)

    @property
    def field_bytes(self) -> int:
        """The most memory one block's loaded field takes (0 when not known)."""
        return max(s.nbytes for s in self.sources.values())

    @property
    def field_load_bytes(self) -> int:
        """The most memory one field's load takes on top of the cache (its whole tensor file)."""
        return max(s.load_nbytes for s in self.sources.values())

    @property
    def block_rects(self) -> np.ndarray:
        """(B, 4) float64 (x0, y0, x1, y1) of each renderable block's field box on the ground plane
        (``block_ids`` order): a vertical ray meets block ``b`` only inside its rectangle."""
        return self._aabbs[:, :, :2].permute(0, 2, 1).reshape(-1, 4)[:, [0, 2, 1, 3]].cpu().double().numpy()

    def set_cache_size(self, max_cached_blocks: int) -> None:
        """Keep at most ``max_cached_blocks`` fields loaded (the least recently used go first)."""
        if max_cached_blocks < 1:
            raise CitygenError(None, f"max_cached_blocks must be >= 1, got {max_cached_blocks}")
        self.max_cached_blocks = int(max_cached_blocks)
        while len(self._cache) > self.max_cached_blocks:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        """Forget every loaded field (they are reloaded, and re-wrapped, on next use)."""
        self._cache.clear()

    def _fields(self, block_id: str) -> tuple[Any, Any]:
        """(the block's field, the field to render: wrapped by ``field_wrapper`` when set)."""
        if block_id in self._cache:
            self._cache.move_to_end(block_id)
            return self._cache[block_id]
        raw = self.sources[block_id].load()
        self.field_loads += 1
        shown = self._field_wrapper(block_id, raw) if self._field_wrapper is not None else raw
        self._cache[block_id] = (raw, shown)
        while len(self._cache) > self.max_cached_blocks:
            self._cache.popitem(last=False)
        return raw, shown

    def field(self, block_id: str) -> Any:
        """The (wrapped) field of one block, loaded through the cache."""
        if block_id not in self.sources:
            raise CitygenError(None, f"no trained block {block_id!r} in this tile")
        return self._fields(block_id)[1]

    # -- rays ----------------------------------------------------------------------------------
    def _hits(self, origins: Tensor, dirs: Tensor) -> Tensor:
        """(N, B) whether each ray passes through each block's field box."""
        cols = [intersect_aabb(origins, dirs, self._aabbs[k])[2] for k in range(len(self.block_ids))]
        return torch.stack(cols, dim=-1)

    def blocks_for_rays(self, origins: Tensor, dirs: Tensor) -> list[str]:
        """Ids of the blocks whose field box at least one of the rays passes through."""
        o, d = origins.to(self.device, torch.float32), dirs.to(self.device, torch.float32)
        hit = self._hits(o, d).any(0).tolist()
        return [b for b, h in zip(self.block_ids, hit) if h]

    def blend_weights(self, points: Tensor) -> Tensor:
        """Normalised blend weights (N, B) of the renderable blocks (``block_ids`` order) at
        points (N, 3); rows sum to 1 where a block's core covers the point, less towards the
        outer edges of the tile's margin, 0 outside every block."""
        w = blend_weights(points.to(self.device, torch.float32), self._cores, self._extended, self._aabbs)
        return (w / w.sum(-1, keepdim=True).clamp_min(1.0)).cpu()

    @torch.no_grad()
    def render_rays(self, origins: Tensor, dirs: Tensor, appearance: Any = None) -> dict[str, Tensor]:
        """Render rays (N, 3) through the blended tile (unit directions, local frame).

        Returns float32 CPU tensors: ``rgb`` (N, 3) in [0, 1], ``distance`` (N,) expected hit
        distance along the ray (metres), ``acc`` (N,), ``semantics`` (N, C) logits, and
        ``weights`` (N, B) each block's share of the ray (``block_ids`` order).
        """
        o = origins.to(self.device, torch.float32).reshape(-1, 3)
        d = dirs.to(self.device, torch.float32).reshape(-1, 3)
        chunk = max(int(self.render_config.chunk_rays), 1)
        per_ray = isinstance(appearance, Tensor) and appearance.ndim == 2
        if per_ray and appearance.shape[0] != o.shape[0]:
            raise CitygenError(None, f"appearance has {appearance.shape[0]} rows for {o.shape[0]} rays")
        parts = [self._render_chunk(o[i:i + chunk], d[i:i + chunk],
                                    appearance[i:i + chunk] if per_ray else appearance)
                 for i in range(0, o.shape[0], chunk)]
        if not parts:
            parts = [self._render_chunk(o, d, appearance)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _render_chunk(self, o: Tensor, d: Tensor, appearance: Any) -> dict[str, Tensor]:
        R, C, B = o.shape[0], len(self.classes), len(self.block_ids)
        hits = self._hits(o, d) if R else torch.zeros(0, B, dtype=torch.bool, device=self.device)
        used = [k for k in range(B) if bool(hits[:, k].any())]
        owner = self._background_owner(o, d)
        needed = sorted(set(used) | set(owner.unique().tolist()))
        fields = {k: self._fields(self.block_ids[k]) for k in needed}

        bg_rgb, bg_sem = self._backgrounds(owner, d, fields)
        out = {"rgb": bg_rgb, "distance": o.new_zeros(R), "acc": o.new_zeros(R), "semantics": bg_sem,
               "weights": o.new_zeros(R, B)}
        if not used:
            return {k: v.float().cpu() for k, v in out.items()}
        rays = hits[:, used].any(-1).nonzero().squeeze(-1)
        ro, rd = o[rays], d[rays]
        codes, dims = [], []
        if isinstance(appearance, Tensor) and appearance.ndim == 2:
            appearance = appearance[rays.to(appearance.device)]
        for k in used:
            code = self._codes(k, fields[k][0], ro, appearance)
            codes.append(code)
            dims.append(code.shape[1])
        render_fields = [fields[k][1] for k in used]
        blended = _BlendedField(render_fields, self._cores[used], self._extended[used], self._aabbs[used], dims,
                                C, bg_rgb[rays], bg_sem[rays], box=self._box, density_blend=self.density_blend)
        grids = [getattr(f, "occupancy", None) if hasattr(f, "occupancy") else getattr(raw, "occupancy", None)
                 for (raw, f) in (fields[k] for k in used)]
        rc = self.render_config
        r = volume_render_rays(blended, ro, rd, torch.cat(codes, -1), step_size=rc.step_size,
                               occupancy=_BlendedOccupancy(grids, self._aabbs[used]), segment=rc.segment_samples,
                               min_transmittance=rc.min_transmittance, with_semantics=True)
        acc = r["acc"]
        share = r["semantics"][:, C:]  # sum of quadrature weights per block; sums to acc
        weights = o.new_zeros(rays.numel(), B)
        weights[:, used] = torch.where(acc[:, None] > 1e-6, share / acc.clamp_min(1e-10)[:, None],
                                       torch.zeros_like(share))
        out["rgb"][rays] = r["rgb"]
        out["distance"][rays] = torch.where(acc > 1e-10, r["depth"], torch.zeros_like(acc))
        out["acc"][rays] = acc
        out["semantics"][rays] = r["semantics"][:, :C]
        out["weights"][rays] = weights
        return {k: v.float().cpu() for k, v in out.items()}

    def _background_owner(self, o: Tensor, d: Tensor) -> Tensor:
        return background_owner(o, d, self.bounds, self._cores)

    def _backgrounds(self, owner: Tensor, d: Tensor, fields: dict[int, tuple[Any, Any]]) -> tuple[Tensor, Tensor]:
        R, C = d.shape[0], len(self.classes)
        rgb = d.new_zeros(R, 3)
        sem = d.new_zeros(R, C)
        for k in owner.unique().tolist():
            rows = (owner == k).nonzero().squeeze(-1)
            shown = fields[k][1]
            rgb[rows] = shown.background(d[rows]).float()
            sem[rows] = torch.as_tensor(shown.background_semantics, dtype=torch.float32, device=d.device).expand(rows.numel(), C)
        if self.background_color is not None:
            rgb[:] = torch.as_tensor(self.background_color, dtype=torch.float32, device=d.device)
        return rgb, sem

    def _codes(self, k: int, raw: Any, origins: Tensor, appearance: Any) -> Tensor:
        """(R, A) appearance codes of block ``k`` for rays starting at ``origins``."""
        block_id = self.block_ids[k]
        if isinstance(appearance, dict):
            appearance = appearance.get(block_id)
        if isinstance(appearance, Tensor):
            code = appearance.to(self.device, torch.float32)
            return code.expand(origins.shape[0], -1) if code.ndim == 1 else code
        if isinstance(appearance, str):
            names = self.sources[block_id].image_names
            if appearance in names and hasattr(raw, "appearance"):
                return raw.appearance.weight[names.index(appearance)].float().expand(origins.shape[0], -1)
        elif appearance is not None:
            raise CitygenError(None, f"appearance must be None, an image name, a code tensor or a dict, "
                                     f"got {type(appearance).__name__}")
        return nearest_camera_codes(raw, origins)

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def render_view(self, camera: Camera, c2w: np.ndarray, appearance: Any = None) -> dict[str, Tensor]:
        """Render one view: ``rgb`` (H, W, 3), ``depth`` (H, W) z-depth metres, ``acc`` (H, W),
        ``semantics`` (H, W, C) logits, ``weights`` (H, W, B); float32 CPU tensors."""
        origins, dirs, z_scale = camera_rays(camera, c2w, device=self.device)
        r = self.render_rays(origins, dirs, appearance)
        H, W = camera.height, camera.width
        return {"rgb": r["rgb"].reshape(H, W, 3), "depth": (r["distance"] * z_scale.cpu()).reshape(H, W),
                "acc": r["acc"].reshape(H, W), "semantics": r["semantics"].reshape(H, W, -1),
                "weights": r["weights"].reshape(H, W, -1)}


def background_owner(origins: Tensor, dirs: Tensor, bounds: Any, cores: Tensor) -> Tensor:
    """Per ray, the index of the block whose core (``cores`` (B, 4)) is nearest (horizontally)
    to where the ray leaves the tile's box ``bounds`` (2, 3) -- the camera's position for a ray
    that misses the box.  The compositor shows that block's learned background; tile training
    (:mod:`citygen.tile`) hands the same block the pixels that no block's box explains."""
    box = torch.as_tensor(bounds, dtype=torch.float32, device=origins.device)
    _, t_far, hit = intersect_aabb(origins, dirs, box)
    p = torch.where(hit[:, None], origins + t_far.clamp_min(0)[:, None] * dirs, origins)[:, :2]
    cores = cores.to(origins.device)
    lo, hi = cores[None, :, :2], cores[None, :, 2:]
    gap = (torch.maximum(lo - p[:, None], torch.zeros_like(lo)) + torch.maximum(p[:, None] - hi, torch.zeros_like(hi)))
    return gap.norm(dim=-1).argmin(-1)


def nearest_camera_codes(field: Any, origins: Tensor) -> Tensor:
    """The test-view rule per ray: the code of the field's training camera nearest to each origin."""
    uniq, inverse = torch.unique(origins, dim=0, return_inverse=True)
    if hasattr(field, "camera_positions") and hasattr(field, "appearance"):
        cams = field.camera_positions.to(uniq)
        nearest = torch.cdist(uniq, cams).argmin(-1)
        codes = field.appearance.weight[nearest].float()
    elif hasattr(field, "appearance_for_position"):
        codes = torch.stack([field.appearance_for_position(p).float() for p in uniq])
    else:
        codes = uniq.new_zeros(uniq.shape[0], 0)
    return codes[inverse]


def _read_sidecar(sidecar: Path) -> tuple[dict[str, Any], np.ndarray, tuple[str, ...], Any]:
    """(meta, field box (2, 3), classes, training config) from a checkpoint sidecar, without the tensors."""
    meta = read_sidecar(sidecar)
    try:
        cfg = from_dict(meta["config"], str(sidecar))
    except (ValueError, KeyError, TypeError) as err:
        raise CitygenError(sidecar, f"not a readable checkpoint sidecar ({err})") from None
    return meta, np.asarray(meta["aabb"], dtype=np.float64), tuple(meta["classes"]), cfg


def _field_nbytes(sidecar: Path, meta: dict[str, Any]) -> tuple[int, int]:
    """(bytes of a checkpoint's field tensors, ``model.*`` with its occupancy grid; bytes of the
    whole tensor file), from the safetensors header alone: what a loaded field holds (without the
    optimizer state that makes up most of the file), and what its load reads at once.  Zeros
    when the header cannot be read (loading the field then reports that file)."""
    path = sidecar.parent / Path(str(meta.get("tensors_file", ""))).name
    try:
        with safe_open(str(path), framework="pt") as f:
            total = 0
            for key in f.keys():
                if key.startswith("model."):
                    part = f.get_slice(key)
                    total += math.prod(part.get_shape()) * _DTYPE_BYTES.get(part.get_dtype(), 4)
        return total, path.stat().st_size
    except (OSError, SafetensorError, ValueError):
        return 0, 0


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _checkpoint_loader(sidecar: Path, device: str | torch.device) -> Callable[[], Any]:
    def load() -> Any:
        field, _ = load_field(sidecar, device)
        return field
    return load


__all__ = ["SINGLE_BLOCK", "BlockSource", "EditOpener", "TileRenderer", "background_owner", "register_edit_opener", "blend_weights", "nearest_camera_codes", "smoothstep"]
