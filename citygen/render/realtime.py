"""Real-time rendering of a trained CityField: the field packed into flat buffers, one native
kernel launch per block (``cuda_ext.realtime``) for rgb + depth + semantics in one pass.

Why this representation (fused field evaluation, occupancy skipping, early termination) rather
than proposal sampling or a baked mesh/texture: see ``citygen/bench_render.py``'s docstring; in
short, the occupancy grid the trainer already keeps bounds the evaluated samples to a few per
ray on an aerial city (measured on the CPU build, ``citygen bench render``), the field stays
editable and restylable at render time, and semantics and depth come out of the same pass.
On a trained tile a finer occupancy level baked at pack time and an earlier termination cut the
samples further (:mod:`citygen.render.realtime_sampling`, measured there: 15.5 -> 8.2 samples
per ray on the demo tile at >= 44.8 dB against the reference).  With a baked envelope
(:mod:`citygen.render.envelope`) each pixel marches only its narrow band [t_in, t_out]
(``march_block_band``: the same lattice of samples, restricted per pixel).

Packed layout (what ``csrc/realtime_math.h`` reads):

* ``layout`` int32 (18): enc, hidden, geo, sem_hidden, classes, colour hidden layers after the
  first, sh_dim, then the element offsets of density1, density2, color_geo, color_cond,
  color_hidden (consecutive layers), color_out, sem1, sem2, bg_rgb, bg_sem, and the total.
* ``weights``: every ``nn.Linear`` as W (out, in) row-major then b (out); sections start at
  multiples of 8 elements and the total is a multiple of 8 (16-byte copies into shared memory).
  ``color_cond`` keeps only the SH columns: the appearance code is folded into its bias
  (``b + W_app code``), one code per block and frame.
* ``table``: the hash grid's flat parameters; ``offsets`` int32 (L + 1); ``scales`` float32 (L).
* ``occ_bits``: the occupancy grid as a bitfield, cell ``c`` at bit ``c % 32`` of word ``c // 32``
  (cell order of :class:`~citygen.fields.occupancy.OccupancyGrid`), then the fine occupancy
  bricks baked at pack time (:mod:`citygen.render.realtime_sampling`), when there are any.
* ``geom_f`` float32 (24): field AABB, clip box (the part of space the block renders: its core
  in a tile, the AABB alone), occupancy box, density scale, step, log of the termination
  transmittance, and the hash grid's normalisation lengths (``u = (x - aabb_min) / length``,
  :meth:`CityField.normalize`); ``geom_i`` int32 (7): occupancy resolution, levels, active levels, features,
  fine occupancy cells per coarse cell along x, y, z (1, 1, 1: no fine level).

On the CPU the buffers are float32; on CUDA ``weights`` and ``table`` are float16 (float
accumulation).  Pinhole cameras only; distorted cameras go through the torch reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cuda_ext import realtime as rt_ext
from survey_io import Camera

from ..cameras import project
from ..config import RenderConfig
from ..errors import CitygenError
from .realtime_sampling import RealtimeSampling, bake_fine_occupancy, fine_bits, fine_factors, sigma_threshold
from .sampling import camera_rays
from .volume import render_image

LAYOUT_INTS = 18
GEOM_FLOATS = 21
MAX_WIDTH = 64
MAX_CLASSES = 16
BACKENDS = ("auto", "native", "torch")


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _linears(seq: nn.Module) -> list[nn.Linear]:
    return [m for m in seq.modules() if isinstance(m, nn.Linear)]


@dataclass
class PackedField:
    """One block's field in the flat buffers of the native kernels (module docstring).

    ``cond_weight``/``cond_bias`` keep the appearance half of the colour conditioning layer, so
    :meth:`set_appearance` can refold a new code without repacking.
    """

    layout: Tensor          # int32 (18,), CPU
    weights: Tensor         # float32 (CPU) / float16 (CUDA)
    table: Tensor
    offsets: Tensor         # int32 (L + 1,)
    scales: Tensor          # float32 (L,)
    occ_bits: Tensor        # int32 words
    geom_f: Tensor          # float32 (24,), CPU: aabb, clip, occupancy box, density scale, step, log T_min, norm extent
    geom_i: Tensor          # int32 (7,), CPU: occupancy res, levels, active levels, features, fine factors
    cond_weight: Tensor     # (H, A) float32, CPU: appearance columns of color_cond
    cond_bias: Tensor       # (H,) float32, CPU
    level_scales: tuple[float, ...]
    n_classes: int

    @property
    def aabb(self) -> np.ndarray:
        return self.geom_f[:6].numpy().reshape(2, 3).astype(np.float64)

    @property
    def clip(self) -> np.ndarray:
        return self.geom_f[6:12].numpy().reshape(2, 3).astype(np.float64)

    @property
    def n_levels(self) -> int:
        return int(self.geom_i[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers that live on the device."""
        return sum(t.numel() * t.element_size() for t in (self.weights, self.table, self.offsets, self.scales,
                                                          self.occ_bits))

    def set_appearance(self, code: Tensor) -> None:
        """Fold appearance code ``code`` (A,) into the colour conditioning bias."""
        off = int(self.layout[10])
        hidden, sh_dim = int(self.layout[1]), int(self.layout[6])
        bias = self.cond_bias + self.cond_weight @ code.detach().float().cpu()
        start = off + hidden * sh_dim
        self.weights[start:start + hidden] = bias.to(self.weights)

    def with_view(self, clip: np.ndarray | None = None, n_active_levels: int | None = None) -> PackedField:
        """A shallow copy whose clip box / active levels differ (buffers shared)."""
        geom_f, geom_i = self.geom_f.clone(), self.geom_i.clone()
        if clip is not None:
            geom_f[6:12] = torch.as_tensor(np.asarray(clip, dtype=np.float32).reshape(6))
        if n_active_levels is not None:
            geom_i[2] = int(min(max(n_active_levels, 1), self.n_levels))
        return replace(self, geom_f=geom_f, geom_i=geom_i)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedField:
        """The device copy: float16 weights and table on CUDA, float32 on the CPU.  With
        ``non_blocking`` from pinned memory, the copies are queued on the current stream."""
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        nb = {"non_blocking": non_blocking}
        return replace(self, weights=self.weights.to(device, **nb).to(dtype),
                       table=self.table.to(device, **nb).to(dtype), offsets=self.offsets.to(device, **nb),
                       scales=self.scales.to(device, **nb), occ_bits=self.occ_bits.to(device, **nb))

    def tensors(self) -> dict[str, Tensor]:
        """Everything as named CPU tensors (for safetensors)."""
        out = {k: getattr(self, k).detach().cpu().contiguous() for k in
               ("layout", "weights", "table", "offsets", "scales", "occ_bits", "geom_f", "geom_i", "cond_weight",
                "cond_bias")}
        out["level_scales_f64"] = torch.tensor(self.level_scales, dtype=torch.float64)
        out["n_classes"] = torch.tensor([self.n_classes], dtype=torch.int32)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> PackedField:
        t = dict(t)
        if t["geom_f"].numel() == 21:  # packed before the norm extent existed: per-axis normalisation
            box = t["geom_f"][:6].reshape(2, 3)
            t["geom_f"] = torch.cat([t["geom_f"], box[1] - box[0]])
        if t["geom_i"].numel() == 4:  # packed before render-time sampling existed: the reference's
            t["geom_i"] = torch.cat([t["geom_i"], torch.ones(3, dtype=torch.int32)])
        return cls(layout=t["layout"], weights=t["weights"], table=t["table"], offsets=t["offsets"],
                   scales=t["scales"], occ_bits=t["occ_bits"], geom_f=t["geom_f"], geom_i=t["geom_i"],
                   cond_weight=t["cond_weight"], cond_bias=t["cond_bias"],
                   level_scales=tuple(float(v) for v in t["level_scales_f64"]), n_classes=int(t["n_classes"][0]))


def _norm_extent(field: Any) -> Tensor:
    """The field's hash-grid normalisation lengths (3,); per axis for fields without one."""
    ext = getattr(field, "norm_extent", None)
    if ext is None:
        ext = field.aabb[1] - field.aabb[0]
    return torch.as_tensor(ext).detach().float().cpu().reshape(3)


def occupancy_bits(occupied: Tensor) -> Tensor:
    """Pack a flat bool occupancy (n,) into int32 words: cell c -> bit c % 32 of word c // 32."""
    flat = occupied.detach().reshape(-1).cpu().numpy().astype(bool)
    pad = (-flat.size) % 32
    bits = np.packbits(np.concatenate([flat, np.zeros(pad, dtype=bool)]), bitorder="little")
    return torch.from_numpy(bits.view("<u4").astype(np.uint32).view(np.int32).copy())


@torch.no_grad()
def pack_field(field: Any, render: RenderConfig | None = None, appearance: Tensor | None = None,
               sampling: RealtimeSampling | None = None) -> PackedField:
    """Pack a :class:`~citygen.fields.CityField` (and its ``occupancy``) into float32 CPU buffers.

    Args:
        field: the trained field.
        render: marching settings (step size, termination threshold).
        appearance: the appearance code (A,) folded into the colour layer; None = zeros
            (set a real one with :meth:`PackedField.set_appearance`).
        sampling: render-time sample reduction (fine occupancy baked here from the field's
            density, termination threshold); None = :class:`RealtimeSampling` defaults,
            :meth:`RealtimeSampling.reference` = the reference renderer's samples.

    Raises:
        CitygenError: a field shape the kernels do not support (the caller falls back to torch).
    """
    render = render or RenderConfig()
    sampling = sampling or RealtimeSampling()
    enc = field.encoding
    cfg = enc.config
    if cfg.n_features_per_level != 2:
        raise CitygenError(None, f"realtime: needs 2 features per hash level, the field has {cfg.n_features_per_level}")
    density_layers, semantic_layers = _linears(field.density_mlp), _linears(field.semantic_mlp)
    if len(density_layers) != 2 or len(semantic_layers) != 2:
        raise CitygenError(None, "realtime: the density and semantic MLPs must have one hidden layer each")
    d1, d2 = density_layers
    s1, s2 = semantic_layers
    color = _linears(field.color_mlp)
    E, H, G = d1.in_features, d1.out_features, d2.out_features - 1
    S, C = s1.out_features, s2.out_features
    sh_dim = field.sh_dim
    if max(E, H, G, S) > MAX_WIDTH or C > MAX_CLASSES or sh_dim > 16:
        raise CitygenError(None, f"realtime: layer widths beyond the kernel's bounds (max {MAX_WIDTH} wide, "
                                 f"{MAX_CLASSES} classes, SH degree 4)")
    cond = field.color_cond
    cond_w = cond.weight.detach().float().cpu()

    sections: list[tuple[str, list[Tensor]]] = [
        ("density1", [d1.weight, d1.bias]),
        ("density2", [d2.weight, d2.bias]),
        ("color_geo", [field.color_geo.weight]),
        ("color_cond", [cond_w[:, :sh_dim], cond.bias]),
        ("color_hidden", [p for lin in color[:-1] for p in (lin.weight, lin.bias)]),
        ("color_out", [color[-1].weight, color[-1].bias]),
        ("sem1", [s1.weight, s1.bias]),
        ("sem2", [s2.weight, s2.bias]),
        ("bg_rgb", [field.background_rgb.weight, field.background_rgb.bias]),
        ("bg_sem", [field.background_semantics]),
    ]
    chunks, offsets, pos = [], {}, 0
    for name, params in sections:
        offsets[name] = pos
        flat = torch.cat([p.detach().float().cpu().reshape(-1) for p in params]) if params else torch.zeros(0)
        padded = torch.zeros(_pad8(flat.numel()))
        padded[:flat.numel()] = flat
        chunks.append(padded)
        pos += padded.numel()
    weights = torch.cat(chunks).contiguous()
    layout = torch.tensor([E, H, G, S, C, len(color) - 1, sh_dim, offsets["density1"], offsets["density2"],
                           offsets["color_geo"], offsets["color_cond"], offsets["color_hidden"],
                           offsets["color_out"], offsets["sem1"], offsets["sem2"], offsets["bg_rgb"],
                           offsets["bg_sem"], pos], dtype=torch.int32)

    aabb = field.aabb.detach().float().cpu()
    occ = getattr(field, "occupancy", None)
    factors = (1, 1, 1)
    if occ is not None:
        occ_box, occ_res, bits = occ.aabb.detach().float().cpu(), occ.resolution, occupancy_bits(occ.occupied)
        if sampling.occupancy_factor > 1:
            factors = fine_factors(occ, render.step_size, sampling.occupancy_factor, sampling.fine_cell_steps)
        if factors != (1, 1, 1):
            fine = bake_fine_occupancy(lambda x: field.density(x)[0], occ, factors,
                                       sigma_threshold(sampling.skip_alpha, render.step_size))
            bits = torch.cat([bits, fine_bits(fine)])
    else:  # no grid: one occupied cell over the box
        occ_box, occ_res, bits = aabb, 1, torch.tensor([1], dtype=torch.int32)
    min_t = render.min_transmittance if sampling.min_transmittance is None else sampling.min_transmittance
    log_min_t = math.log(min_t) if min_t > 0 else -1e30
    geom_f = torch.cat([aabb.reshape(-1), aabb.reshape(-1), occ_box.reshape(-1),
                        torch.tensor([field.inv_unit_length, render.step_size, log_min_t]),
                        _norm_extent(field)]).float()
    geom_i = torch.tensor([occ_res, cfg.n_levels, cfg.n_levels, 2, *factors], dtype=torch.int32)
    packed = PackedField(layout=layout, weights=weights, table=enc.params.detach().float().cpu().contiguous(),
                         offsets=enc.level_offsets.detach().cpu().to(torch.int32).contiguous(),
                         scales=enc.level_scales.detach().cpu().float().contiguous(), occ_bits=bits,
                         geom_f=geom_f, geom_i=geom_i, cond_weight=cond_w[:, sh_dim:].contiguous(),
                         cond_bias=cond.bias.detach().float().cpu().clone(),
                         level_scales=tuple(lv.scale for lv in enc.levels), n_classes=C)
    if appearance is not None:
        packed.set_appearance(appearance)
    return packed


def camera_vector(camera: Camera, c2w: np.ndarray | Tensor) -> Tensor:
    """The kernels' camera: fx, fy, cx, cy, then the 3x4 OpenCV camera-to-world, float32 (16,)."""
    m = np.asarray(c2w.detach().cpu() if isinstance(c2w, Tensor) else c2w, dtype=np.float64)[:3, :4]
    return torch.tensor([camera.fl_x, camera.fl_y, camera.cx, camera.cy, *m.reshape(-1)], dtype=torch.float32)


def pixel_rect(camera: Camera, c2w: np.ndarray, box: np.ndarray, near: float = 1e-3) -> tuple[int, int, int, int]:
    """Pixel rectangle (x0, y0, x1, y1) that covers the projection of ``box`` (2, 3); the whole
    image when a corner lies behind the camera, an empty rect when the box is off screen."""
    W, H = camera.width, camera.height
    corners = np.array([[box[i][0], box[j][1], box[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    uv, z = project(camera, c2w, corners.astype(np.float64))
    if np.any(z <= near):
        return 0, 0, W, H
    u, v = uv[:, 0], uv[:, 1]
    x0, x1 = int(max(math.floor(u.min()) - 1, 0)), int(min(math.ceil(u.max()) + 1, W))
    y0, y1 = int(max(math.floor(v.min()) - 1, 0)), int(min(math.ceil(v.max()) + 1, H))
    if x0 >= x1 or y0 >= y1:
        return 0, 0, 0, 0
    return x0, y0, x1, y1


class FrameState:
    """Per-pixel compositing state carried across the blocks of one frame (front to back)."""

    def __init__(self, n_pixels: int, n_classes: int, device: torch.device, with_semantics: bool = True):
        f32 = {"dtype": torch.float32, "device": device}
        self.rgb = torch.zeros(n_pixels, 3, **f32)
        self.depth_sum = torch.zeros(n_pixels, **f32)
        self.log_t = torch.zeros(n_pixels, **f32)
        self.sem = torch.zeros(n_pixels, n_classes, **f32) if with_semantics else torch.zeros(0, **f32)
        self.n_samples = torch.zeros(n_pixels, dtype=torch.int32, device=device)


def march(module: Any, state: FrameState, block: PackedField, cam: Tensor, width: int,
          rect: tuple[int, int, int, int], band: Tensor | None = None) -> None:
    """Composite one (device-resident) block into ``state`` over pixel rect ``rect``; with ``band``
    (n_pixels, 2) float32 on the device, each pixel's ray only over its (t_in, t_out)
    (:mod:`citygen.render.envelope`)."""
    x0, y0, x1, y1 = rect
    if x1 <= x0 or y1 <= y0:
        return
    if band is not None:
        module.march_block_band(state.rgb, state.depth_sum, state.log_t, state.sem, state.n_samples, block.weights,
                                block.table, block.offsets, block.scales, block.occ_bits, block.layout, block.geom_f,
                                block.geom_i, cam, int(width), int(x0), int(y0), int(x1), int(y1),
                                band.contiguous())
        return
    module.march_block(state.rgb, state.depth_sum, state.log_t, state.sem, state.n_samples, block.weights,
                       block.table, block.offsets, block.scales, block.occ_bits, block.layout, block.geom_f,
                       block.geom_i, cam, int(width), int(x0), int(y0), int(x1), int(y1))


def finish(module: Any, state: FrameState, background: PackedField, cam: Tensor, camera: Camera) -> dict[str, Tensor]:
    """Background, z-depth and semantics; returns the frame's images (H, W, ...)."""
    H, W = camera.height, camera.width
    depth = module.finish(state.rgb, state.depth_sum, state.log_t, state.sem, background.weights,
                          background.layout, cam, int(W))
    out = {"rgb": state.rgb.reshape(H, W, 3), "depth": depth.reshape(H, W),
           "acc": (1.0 - torch.exp(state.log_t)).reshape(H, W), "n_samples": state.n_samples.reshape(H, W)}
    if state.sem.numel():
        out["semantics"] = state.sem.reshape(H, W, -1)
    return out


def native_module(device: torch.device | str) -> Any | None:
    """The real-time build for ``device`` (None when it cannot be built here)."""
    return rt_ext.module_for(device)


class RealtimeRenderer:
    """Renders one trained field with the native real-time kernels (rgb, depth, semantics).

    Args:
        field: a :class:`~citygen.fields.CityField` with its ``occupancy`` grid.
        render: marching settings (defaults: the field's training settings are the caller's to pass).
        device: where to render; defaults to the field's device.
        backend: ``"native"`` (the cuda_ext build for the device; error if missing), ``"torch"``
            (the reference renderer) or ``"auto"`` (native where it builds, else torch).
        sampling: the native path's sample reduction (:class:`RealtimeSampling`; None = its
            defaults); the torch backend always renders the reference samples.
        envelope: the block's baked :class:`~citygen.render.envelope.Envelope`: the native path
            then marches each pixel only over its narrow band (ray-cast on the CPU every frame).

    Attributes:
        backend: the backend in use ("native" or "torch"); ``fallback_reason`` says why torch.
        timings: seconds of the last frame's stages (pack, march, finish).
    """

    def __init__(self, field: Any, render: RenderConfig | None = None, device: torch.device | str | None = None,
                 backend: str = "auto", sampling: RealtimeSampling | None = None, envelope: Any = None):
        if backend not in BACKENDS:
            raise CitygenError(None, f"realtime: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
        self.field = field
        self.envelope = envelope
        self.render_config = render or RenderConfig()
        self.device = torch.device(device) if device is not None else field.aabb.device
        self.fallback_reason = ""
        self.timings: dict[str, float] = {}
        self._module = None
        self._packed: PackedField | None = None
        self._code_key: Any = None
        if backend != "torch":
            self._module = native_module(self.device)
            if self._module is None:
                self.fallback_reason = rt_ext.unavailable_reason() or "cuda_ext is not importable"
            else:
                try:
                    self._packed = pack_field(field, self.render_config, sampling=sampling).to(self.device)
                except CitygenError as err:
                    self.fallback_reason = str(err)
                    self._module = None
            if self._module is None and backend == "native":
                raise CitygenError(None, f"realtime: native backend unavailable: {self.fallback_reason}")
        else:
            self.fallback_reason = "backend 'torch' requested"
        self.backend = "native" if self._module is not None else "torch"

    @property
    def packed(self) -> PackedField | None:
        """The device-resident packed field (None on the torch backend)."""
        return self._packed

    def _code(self, appearance: Tensor | int | None, origin: Tensor) -> Tensor:
        if appearance is None:
            return self.field.appearance_for_position(origin)
        if isinstance(appearance, int):
            return self.field.appearance.weight[appearance]
        return appearance

    @torch.no_grad()
    def render(self, camera: Camera, c2w: np.ndarray | Tensor, appearance: Tensor | int | None = None,
               with_semantics: bool = True, n_active_levels: int | None = None) -> dict[str, Tensor]:
        """Render one view: ``rgb`` (H, W, 3), ``depth`` (H, W) z-depth metres, ``acc`` (H, W),
        ``semantics`` (H, W, C) logits, and on the native backend ``n_samples`` (H, W) field
        evaluations per ray.  Appearance as in :func:`citygen.render.volume.render_image`;
        ``n_active_levels`` evaluates only the coarsest levels (level of detail)."""
        c2w_np = np.asarray(c2w.detach().cpu() if isinstance(c2w, Tensor) else c2w, dtype=np.float64)
        origin = torch.as_tensor(c2w_np[:3, 3], dtype=torch.float32, device=self.field.aabb.device)
        if self.backend == "torch" or camera.has_distortion or camera.camera_model not in ("PINHOLE", "SIMPLE_PINHOLE",
                                                                                         "OPENCV", "RADIAL",
                                                                                         "SIMPLE_RADIAL"):
            start = time.perf_counter()
            out = render_image(self.field, camera, c2w_np, appearance=appearance, render=self.render_config,
                               with_semantics=with_semantics)
            self.timings = {"total": time.perf_counter() - start}
            return out
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        code = self._code(appearance, origin)
        key = code.detach().cpu().numpy().tobytes()
        if key != self._code_key:  # refold the code into the device weights only when it changes
            self._packed.set_appearance(code)
            self._code_key = key
        block = self._packed if n_active_levels is None else self._packed.with_view(n_active_levels=n_active_levels)
        cam = camera_vector(camera, c2w_np)
        state = FrameState(camera.width * camera.height, block.n_classes, self.device, with_semantics)
        band, tb = None, time.perf_counter()
        if self.envelope is not None:  # the CPU ray cast of the first version (envelope.py: GPU rasterisation)
            origins, dirs, _ = camera_rays(camera, c2w_np)
            band = self.envelope.bands(origins, dirs).to(self.device)
        sync()
        t1 = time.perf_counter()
        march(self._module, state, block, cam, camera.width, (0, 0, camera.width, camera.height), band)
        sync()
        t2 = time.perf_counter()
        out = finish(self._module, state, block, cam, camera)
        sync()
        t3 = time.perf_counter()
        self.timings = {"pack": tb - t0, "band": t1 - tb, "march": t2 - t1, "finish": t3 - t2, "total": t3 - t0}
        if band is not None:
            out["band"] = band.reshape(camera.height, camera.width, 2)
        return out


__all__ = ["FrameState", "PackedField", "RealtimeRenderer", "RealtimeSampling", "camera_vector", "finish", "march", "native_module",
           "occupancy_bits", "pack_field", "pixel_rect"]
