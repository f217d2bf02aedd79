"""The edited field: a block's field seen through an edit stack, with the CityField interface.

``EditedField(field, edits, georef=...)`` is an ``nn.Module`` that the volume renderer (and
every renderer that takes a field: reference, tile, export) uses in place of the field: it
has ``aabb`` (grown to hold raised, moved and inserted matter), ``n_classes``,
``occupancy`` (a conservative grid over the edited contents), ``forward(x, dirs,
appearance, ray_index, with_semantics)``, ``density(x)``, ``background(dirs)``,
``background_semantics`` and the appearance lookups (delegated to the field).

The edits are folded in per sample: stage ``k`` of the pipeline is edit ``k`` applied to
stage ``k - 1`` (stage 0 is the field itself, with zero density outside its box).  Edits
are applied in stack order; disabled edits are skipped.  The stack is evaluated in one loop
over the edits, each only on the samples inside its box (:mod:`citygen.edit.pipeline`), so
its cost grows with the edits that touch a sample, not with the stack's length.  The edited
field is for rendering and distillation: no gradient flows through it.

``density(x)`` returns ``(sigma, geo)`` like the field's, but ``geo`` is the sample
position itself: ``color(geo, ...)`` and ``semantics(geo)`` re-run the pipeline there, so
code written against the geo-feature API works unchanged (at the cost of a second pass).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from survey_io.semantics import CLASSES

from ..errors import CitygenError
from ..fields.occupancy import OccupancyGrid
from ..store.checkpoint import check_finite
from ..store.field import load_field
from .ground import GroundHeight, estimate_ground, ground_from_spec
from .ops import OP_CLASSES, resolve_in_tile
from .pipeline import Pipeline
from .raster import Raster2D
from .samples import Rays, Samples
from .selection import SpecError, build_selection
from .stack import EditStack

CHUNK = 1 << 18
COLOR_MODULES = ("color_geo", "color_cond", "color_mlp")


def default_code(field) -> Tensor:
    """The appearance code used where no view gives one (ground fill, assets): the mean code."""
    emb = getattr(field, "appearance", None)
    if emb is None:
        return torch.zeros(0, device=field.aabb.device)
    return emb.weight.detach().mean(0)


def base_samples(field, x: Tensor, rays: Rays | None, need_rgb: bool, own_geo: bool = True) -> Samples:
    """The field's own outputs at ``x``, with zero density outside its box."""
    lo, hi = field.aabb[0].to(x), field.aabb[1].to(x)
    inside = ((x >= lo) & (x <= hi)).all(-1)
    sigma, geo = field.density(x)
    sigma = torch.where(inside, sigma.float(), torch.zeros((), device=x.device))
    rgb = None
    if need_rgb and rays is not None:
        rgb = field.color(geo, rays.dirs, rays.appearance, rays.ray_index).float()
    logits = field.semantics(geo).float()
    if own_geo:
        return Samples(sigma, rgb, logits, geo, torch.ones_like(inside))
    return Samples(sigma, rgb, logits)


class EditContext:
    """What the operations of one block share: the field, georeferencing, ground, rasters."""

    def __init__(self, field, georef=None, ground: GroundHeight | None = None, ground_spec: dict | None = None,
                 tile_dir: Path | None = None, block_id: str = "block", assets: dict | None = None,
                 raster_cell: float | None = None, classes: tuple[str, ...] = CLASSES):
        self.field = field
        self.georef = georef
        self.tile_dir = None if tile_dir is None else Path(tile_dir)
        self.block_id = block_id
        self.assets = dict(assets or {})
        self.classes = classes
        self.n_classes = int(field.n_classes)
        aabb = field.aabb.detach().float().cpu()
        ext = float((aabb[1] - aabb[0])[:2].max())
        #: raster cell (metres) of footprints, ground colour and instance masks.
        self.cell = float(raster_cell or max(ext / 192.0, 0.05))
        #: rings of cells around a removed footprint that ground colour is copied from.
        self.ring_cells = 6
        #: cell (metres) of the footprint a ground fill covers: the coarse scan's cells,
        #: blocks wide, would let the fill cover ground beside the removed object.
        self.fine_cell = min(self.cell, 0.5)
        #: fine cells the fill footprint is grown by: 0, the fill stops where the removed
        #: matter stops (within half a fine cell); a margin closes slivers where a partly covered
        #: cell shows the field under the removed object, at the price of covering real ground.
        self.fine_margin = 0
        #: opacity the removed matter of a column must reach, stacked up, for the fill to cover it.
        self.fill_opacity = 0.5
        self._ground = ground
        self._ground_spec = ground_spec

    # -- ground --------------------------------------------------------------------------------
    @property
    def ground(self) -> GroundHeight:
        if self._ground is None:
            field = self.field

            grid = getattr(field, "occupancy", None)

            def estimate():
                def sample(x):
                    sigma = torch.zeros(x.shape[0], device=x.device)
                    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                    idx = (grid.query(x) if grid is not None else torch.ones_like(sigma, dtype=torch.bool)).nonzero()[:, 0]
                    if idx.numel():  # empty cells are empty: only occupied ones are asked
                        s = base_samples(field, x[idx], None, False)
                        sigma[idx], labels[idx] = s.sigma, s.labels
                    return sigma, labels
                aabb = field.aabb.detach()
                cell = max(self.cell, float((aabb[1] - aabb[0])[:2].max()) / 96)
                return estimate_ground(sample, aabb, cell=cell)

            self._ground = ground_from_spec(self._ground_spec, self.tile_dir, self.georef, estimate)
        return self._ground

    # -- field helpers ---------------------------------------------------------------------------
    def base_samples(self, field, x, rays, need_rgb, own_geo=True) -> Samples:
        return base_samples(field, x, rays, need_rgb, own_geo)

    def default_code(self, field) -> Tensor:
        return default_code(field)

    def _raster(self, cell: float | None = None) -> Raster2D:
        cell = float(cell or self.cell)
        aabb = self.field.aabb.detach().float().cpu()
        ext = (aabb[1] - aabb[0])[:2]
        nx, ny = max(math.ceil(float(ext[0]) / cell), 1), max(math.ceil(float(ext[1]) / cell), 1)
        return Raster2D(torch.zeros(ny, nx, 1), (float(aabb[0, 0]), float(aabb[0, 1])), (cell, cell))

    @torch.no_grad()
    def scan(self, stage: Callable, occ: Callable, predicate: Callable, band: tuple[float, float] | None = None,
             bound: Callable | None = None, cell: float | None = None, within: Raster2D | None = None,
             column_opacity: float | None = None, top: bool = False, box: Tensor | None = None) -> Raster2D:
        """2-D mask of the columns holding matter (opacity > 0.1 per step) where ``predicate(x,
        labels)`` holds; columns span ``band`` metres about the ground, or the whole box.
        With ``column_opacity``, a column counts when that matter, stacked up, is at least
        this opaque (it would hide what lies below it) instead.  With ``top``, the raster
        holds the height (local z) of the highest such matter per column, -inf where none.

        ``cell`` overrides the raster's cell size; ``within`` (a mask raster, any cell size)
        limits the test to the columns whose centre lies in one of its set cells (the others
        are reported empty): a fine scan refines a coarse one where it found something.
        ``box`` (2, 3), a box holding ``bound``: columns outside it are reported empty without
        asking the field (a small edit scans its own surroundings, not the whole block)."""
        raster = self._raster(cell)
        rows, cols = raster.shape
        xy_all = raster.cell_centres().reshape(-1, 2)
        columns = torch.arange(xy_all.shape[0])
        if within is not None:
            r, c, inside = within.index(xy_all)
            columns = (inside & (within.values[r, c, 0] > 0)).nonzero().squeeze(-1)
        if box is not None:
            lo, hi = box[0, :2].to(xy_all), box[1, :2].to(xy_all)
            pad = 1e-3 + 1e-6 * torch.maximum(lo.abs(), hi.abs()).nan_to_num(0.0, 0.0, 0.0)
            xy_c = xy_all[columns]
            columns = columns[((xy_c >= lo - pad) & (xy_c <= hi + pad)).all(-1)]
        xy = xy_all[columns]
        aabb = self.field.aabb.detach().float().cpu()
        if band is None:
            dz = max(float(aabb[1, 2] - aabb[0, 2]) / 128.0, min(raster.cell[0], 0.25))
            z = torch.arange(float(aabb[0, 2]) + dz / 2, float(aabb[1, 2]), dz)
            zz = z[None, :].expand(xy.shape[0], -1)
        else:
            dz = min(raster.cell[0], 0.25)
            z = torch.arange(band[0] + dz / 2, band[1], dz)
            zz = self.ground.height(xy)[:, None] + z[None, :]
        nz = zz.shape[1]
        pts = torch.cat([xy[:, None, :].expand(-1, nz, -1), zz[..., None]], dim=-1).reshape(-1, 3)
        device = self.field.aabb.device
        hit = torch.zeros(pts.shape[0], dtype=torch.bool)
        tau = torch.zeros(pts.shape[0])  # optical depth of the matching matter per sample
        threshold = 0.1 / dz
        for i in range(0, pts.shape[0], CHUNK):
            x = pts[i:i + CHUNK].to(device)
            if bound is not None:  # the cheap geometric test first: the stack's occupancy only where it holds
                keep = bound(x)
                sub = keep.nonzero().squeeze(-1)
                if sub.numel():
                    keep[sub] = occ(x[sub])
            else:
                keep = occ(x)
            idx = keep.nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            s = stage(x[idx], None, False)
            m = predicate(x[idx], s.labels)
            hit[i + idx.cpu()] = ((s.sigma > threshold) & m).cpu()
            tau[i + idx.cpu()] = torch.where(m, s.sigma.float() * dz, torch.zeros((), device=m.device)).cpu()
        if top:
            z_hit = torch.where(hit.reshape(-1, nz), pts[:, 2].reshape(-1, nz), torch.full((), -math.inf))
            heights = torch.full((rows * cols,), -math.inf)
            heights[columns] = z_hit.amax(-1) if nz else -math.inf
            return Raster2D(heights.reshape(rows, cols, 1), raster.origin, raster.cell)
        mask = torch.zeros(rows * cols)
        if column_opacity is None:
            mask[columns] = hit.reshape(-1, nz).any(-1).float()
        else:
            mask[columns] = ((1 - torch.exp(-tau.reshape(-1, nz).sum(-1))) >= column_opacity).float()
        return Raster2D(mask.reshape(rows, cols, 1), raster.origin, raster.cell)

    @torch.no_grad()
    def ground_look(self, stage: Callable, window: Raster2D, band: tuple[float, float] = (-1.0, 1.5), n: int = 24):
        """Top-down composite of the ground band over each cell of ``window``:
        (rgb (r, c, 3), class probabilities (r, c, C), opacity (r, c))."""
        rows, cols = window.shape
        xy = window.cell_centres().reshape(-1, 2)
        g = self.ground.height(xy)
        dz = (band[1] - band[0]) / n
        device = self.field.aabb.device
        code = default_code(self.field).to(device)
        rgb = torch.zeros(xy.shape[0], 3)
        probs = torch.zeros(xy.shape[0], self.n_classes)
        log_t = torch.zeros(xy.shape[0])
        for k in range(n):
            z = g + band[1] - (k + 0.5) * dz
            x = torch.cat([xy, z[:, None]], 1).to(device)
            rays = Rays(torch.tensor([0.0, 0.0, -1.0], device=device).expand(x.shape[0], 3),
                        code.expand(x.shape[0], -1))
            s = stage(x, rays, True)
            sigma = s.sigma.float().cpu()
            w = torch.exp(log_t) * (1 - torch.exp(-sigma * dz))
            rgb += w[:, None] * s.rgb.float().cpu()
            probs += w[:, None] * torch.softmax(s.logits.float().cpu(), -1)
            log_t -= sigma * dz
        acc = 1 - torch.exp(log_t)
        norm = acc.clamp_min(1e-6)[:, None]
        return ((rgb / norm).reshape(rows, cols, 3), (probs / norm).reshape(rows, cols, -1), acc.reshape(rows, cols))

    # -- files inside the tile -----------------------------------------------------------------
    def _tile_path(self, rel: str) -> Path:
        return resolve_in_tile(self.tile_dir, rel)

    def load_asset(self, rel: str):
        if rel in self.assets:
            return self.assets[rel]
        field, _ = load_field(self._tile_path(rel), device=self.field.aabb.device)
        self.assets[rel] = field
        return field

    def styled_color_field(self, rel: str):
        """A shallow copy of the field whose colour branch holds the weights in ``rel``."""

        path = self._tile_path(rel)
        try:
            tensors = load_file(str(path), device=str(self.field.aabb.device))
        except (OSError, SafetensorError, ValueError, RuntimeError) as err:
            raise SpecError(f"restyle weights {rel!r} unreadable ({err})") from None
        check_finite(tensors, path)  # diverged style weights would paint NaN into every render
        return with_color_branch(self.field, tensors, path)


def color_branch(field) -> dict[str, nn.Module]:
    """The colour branch of a field: its ``color_geo``/``color_cond``/``color_mlp`` modules."""
    mods = {name: getattr(field, name) for name in COLOR_MODULES if isinstance(getattr(field, name, None), nn.Module)}
    if not mods:
        raise CitygenError(None, "this field has no colour branch (color_geo / color_cond / color_mlp)")
    return mods


def with_color_branch(field, tensors: dict[str, Tensor], source=None):
    """A shallow copy of ``field`` (sharing everything else) with its colour branch replaced by a
    copy loaded from ``tensors`` (keys ``<module>.<param>``)."""
    styled = copy.copy(field)
    styled._modules = dict(field._modules)
    for name, mod in color_branch(field).items():
        new = copy.deepcopy(mod)
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            new.load_state_dict(sd)
        except RuntimeError as err:
            raise CitygenError(source, f"colour-branch weights do not fit this field ({str(err).splitlines()[0]})") from None
        styled._modules[name] = new
    return styled


class EditedField(nn.Module):
    """``field`` with ``edits`` (dicts as in the edit stack, or an :class:`EditStack`) applied.

    Args:
        field: a CityField (or anything with its interface).
        edits: the edits; only ``enabled`` ones apply, in order.
        georef: the tile's georef (polygons and anchors in CRS or lon/lat need it).
        ground: ground model; default from the stack's ``ground`` entry, a ``dtm.tif`` in the
            tile folder, or estimated from the field.
        tile_dir: the tile folder (asset and weight paths are relative to it).
        block_id: the block this field is (per-block restyle weights).
        assets: in-memory fields for ``insert`` by asset name (scripted use, tests).
        raster_cell: metres per cell of the footprint / ground rasters.
    """

    def __init__(self, field, edits, georef=None, ground: GroundHeight | None = None, tile_dir: Path | None = None,
                 block_id: str = "block", assets: dict | None = None, raster_cell: float | None = None):
        super().__init__()

        ground_spec = None
        if isinstance(edits, EditStack):
            ground_spec = edits.ground
            tile_dir = tile_dir if tile_dir is not None else edits.tile_dir
            edits = edits.edits
        # registered before `field`: attribute lookups fall back to the field (see __getattr__)
        self.register_buffer("aabb", field.aabb.detach().float().clone())
        self.field = field
        self.n_classes = int(field.n_classes)
        self.ctx = EditContext(field, georef, ground, ground_spec, tile_dir, block_id, assets, raster_cell)
        ctx = self.ctx
        base_occ_grid = getattr(field, "occupancy", None)
        stage: Callable = lambda x, rays, need_rgb: base_samples(field, x, rays, need_rgb)
        if base_occ_grid is not None:
            occ: Callable = lambda x: base_occ_grid.query(x)
        else:
            occ = lambda x: torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        aabb = field.aabb.detach().float().clone()
        self.pipeline = Pipeline(stage, occ, aabb.cpu())
        for edit in _enabled(edits):
            try:
                sel = build_selection(edit.get("selection"), georef, lambda: ctx.ground)
                op = OP_CLASSES[edit["op"]](edit, sel, ctx)
                # prepared against the edits before it (footprints, instances, ground colour)
                op.prepare(self.pipeline.stage(), self.pipeline.occupancy())
            except SpecError as err:
                raise CitygenError(tile_dir, f"edit {edit.get('id', '?')}: {err}") from None
            aabb = op.extend_aabb(aabb)
            self.pipeline.add(op)
        self.ops = self.pipeline.ops
        self._stage, self._occ = self.pipeline.stage(), self.pipeline.occupancy()
        self.aabb = aabb.to(field.aabb.device)
        self.occupancy = None
        if base_occ_grid is not None:
            self.occupancy = self._edited_grid(base_occ_grid)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            field = self.__dict__.get("_modules", {}).get("field")
            if field is None or name.startswith("__"):
                raise
            return getattr(field, name)

    @torch.no_grad()
    def _edited_grid(self, base: OccupancyGrid) -> OccupancyGrid:
        """An occupancy grid over the edited box: each cell is tested at enough points that no
        cell of the base grid falls between them, then dilated by one cell (conservative)."""
        device = self.aabb.device
        # keep the base grid's cell size where the box grew (up to twice the resolution)
        growth = float(((self.aabb[1] - self.aabb[0]) / (base.aabb[1] - base.aabb[0]).to(device)).max())
        r = min(math.ceil(base.resolution * growth - 1e-6), 2 * base.resolution)
        grid = OccupancyGrid(self.aabb.cpu(), r).to(device)
        size = (self.aabb[1] - self.aabb[0]) / r
        base_size = (base.aabb[1] - base.aabb[0]).to(device) / r
        n = torch.ceil(size / base_size - 1e-6).clamp_min(1).long().tolist()
        offsets = torch.stack(torch.meshgrid(*[(torch.arange(k, device=device) + 0.5) / k for k in n], indexing="ij"),
                              -1).reshape(-1, 3)
        cells = torch.arange(grid.n_cells, device=device)
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
        occ = torch.zeros(grid.n_cells, dtype=torch.bool, device=device)
        step = max(CHUNK // len(offsets), 1)
        for i in range(0, grid.n_cells, step):
            corner = self.aabb[0] + ijk[i:i + step] * size
            x = (corner[:, None, :] + offsets[None] * size).reshape(-1, 3)
            occ[i:i + step] = self._occ(x).reshape(-1, len(offsets)).any(-1)
        colour_only = all(op.edit["op"] in ("recolor", "restyle") for op in self.ops)
        if not (colour_only and torch.equal(self.aabb, base.aabb.to(device))):
            # one cell of dilation: moved matter and thin ground layers need not cover a test point
            occ = F.max_pool3d(occ.reshape(1, 1, r, r, r).float(), 3, stride=1, padding=1).reshape(-1) > 0
        grid.occupied.copy_(occ)
        grid.density.copy_(occ.float() * 1e3)
        return grid

    # -- the CityField interface -----------------------------------------------------------------
    def samples(self, x: Tensor, dirs: Tensor | None = None, appearance: Tensor | None = None,
                ray_index: Tensor | None = None) -> Samples:
        """The edited outputs at ``x`` (rgb only when ``dirs`` is given)."""
        rays = None if dirs is None else Rays(dirs, appearance, ray_index)
        return self._stage(x, rays, rays is not None)

    def forward(self, x, dirs, appearance, ray_index=None, with_semantics=True):
        s = self.samples(x, dirs, appearance, ray_index)
        out = {"sigma": s.sigma, "rgb": s.rgb}
        if with_semantics:
            out["semantics"] = s.logits
        return out

    def density(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Edited density (N,) and, as "geometry features", the positions themselves."""
        return self._stage(x, None, False).sigma, x

    def color(self, geo: Tensor, dirs: Tensor, appearance: Tensor, ray_index: Tensor | None = None) -> Tensor:
        return self.samples(geo, dirs, appearance, ray_index).rgb

    def semantics(self, geo: Tensor) -> Tensor:
        return self._stage(geo, None, False).logits

    @torch.no_grad()
    def selected(self, x: Tensor) -> Tensor:
        """(N,) bool: the samples some edit selects, each edit's selection tested on the field
        it reads (the stage before it), plus where mapping edits put matter.  What a pixel's
        unedited ray spends weight on here is what the stack may rightly change in it."""
        return self.pipeline.run(x, None, False, selected=True)[1]

    def background(self, dirs: Tensor) -> Tensor:
        rgb = self.field.background(dirs)
        for op in self.ops:
            rgb = op.background(rgb)
        return rgb


def _enabled(edits: Iterable[dict]) -> list[dict]:
    return [e for e in edits if e.get("enabled", True)]


__all__ = ["EditContext", "EditedField", "base_samples", "color_branch", "default_code", "with_color_branch"]
